// DeadlineTimer: one thread per engine that abandons each transfer at its deadline, so
// the backend is told at once (Backend::cancel) instead of noticing on its next sweep,
// and a transfer nobody observes still ends TIMEOUT on time.
//
// The thread captures only the timer's shared state, never the engine: dropping the job
// it just expired can destroy the engine (and this timer) on the timer's own thread.
#pragma once

#include <memory>
#include <thread>

#include "kvxfer/backend.h"

namespace kvxfer {

class DeadlineTimer {
public:
    DeadlineTimer();
    ~DeadlineTimer();  // stops the thread; pending entries are dropped
    DeadlineTimer(const DeadlineTimer&) = delete;
    DeadlineTimer& operator=(const DeadlineTimer&) = delete;

    // Arms the job's deadline. Holds the job weakly: a job that ends first costs nothing.
    void watch(const std::shared_ptr<TransferJob>& job);

private:
    struct State;
    std::shared_ptr<State> state_;
    std::thread thread_;
};

}  // namespace kvxfer
