// CopyPool: worker threads that execute jobs whose bytes are moved by the CPU (loopback
// memcpy, shm cross-memory attach). Several workers share one large job: each claims
// the next chunk of the job's flattened planes x runs sequence (at most `max_chunk_runs`
// runs and about `target_chunk_bytes` bytes), so a 1 GiB transfer spreads over every
// thread while a small one stays on one.
//
// After the last chunk, one worker reports the data outcome to the core's job machine
// (TransferJob::dataDone); when the core asks for the notification, that worker sends it
// through `commit` and finishes the job. Workers stop claiming chunks of an abandoned or
// failed job.
//
// Workers are threads of the engine's ThreadGroup (joined by Engine::close()) and capture
// only the pool's shared state, never the owning backend. stop() (the engine closing)
// makes them end every queued job (canceled) and return.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "kvxfer/backend.h"
#include "util/thread_group.h"

namespace kvxfer {

class CopyPool {
public:
    // Moves runs [first, end) of the job's flattened sequence (TransferJob::run). Called
    // concurrently.
    using CopyFn = std::function<Status(TransferJob& job, uint64_t first, uint64_t end)>;
    // Delivers job.notify to the peer; called once, after all data is visible. Returns the
    // status to finish the job with, or nullopt when the notification was queued and the
    // commit function's owner finishes the job later (so a worker never waits on a peer).
    using CommitFn = std::function<std::optional<Status>(const std::shared_ptr<TransferJob>& job)>;

    CopyPool(ThreadGroup& group, unsigned threads, uint64_t max_chunk_runs, uint64_t target_chunk_bytes,
             CopyFn copy, CommitFn commit);
    ~CopyPool();  // stop()
    CopyPool(const CopyPool&) = delete;
    CopyPool& operator=(const CopyPool&) = delete;

    // kCanceled once stopped (nothing was queued).
    Status submit(const std::shared_ptr<TransferJob>& job);
    // The workers end what is queued (canceled) and return; never blocks.
    void stop();
    unsigned threads() const { return threads_; }

private:
    struct State;
    std::shared_ptr<State> state_;
    unsigned threads_ = 0;
};

}  // namespace kvxfer
