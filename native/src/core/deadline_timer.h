// DeadlineTimer: one thread per engine that abandons each transfer at its deadline, so
// the backend is told at once (Backend::cancel) instead of noticing on its next sweep,
// and a transfer nobody observes still ends TIMEOUT on time.
//
// The thread is one of the engine's ThreadGroup (joined by Engine::close()) and captures
// only the timer's shared state, never the engine.
#pragma once

#include <memory>

#include "kvxfer/backend.h"
#include "util/thread_group.h"

namespace kvxfer {

class DeadlineTimer {
public:
    explicit DeadlineTimer(ThreadGroup& threads);
    ~DeadlineTimer();  // stop()
    // Tells the thread to end (the group joins it); pending entries are dropped. Never blocks.
    void stop();
    DeadlineTimer(const DeadlineTimer&) = delete;
    DeadlineTimer& operator=(const DeadlineTimer&) = delete;

    // Arms the job's deadline. Holds the job weakly: a job that ends first costs nothing.
    void watch(const std::shared_ptr<TransferJob>& job);

private:
    struct State;
    std::shared_ptr<State> state_;
};

}  // namespace kvxfer
