#include "util/copy_pool.h"

#include <algorithm>

namespace kvxfer {

namespace {

struct ActiveJob {
    std::shared_ptr<TransferJob> job;
    uint64_t total_runs = 0;
    uint64_t chunk_bytes = 0;  // target bytes per chunk for this job
    // Guarded by CopyPool::State::mutex.
    uint64_t next_run = 0;
    uint32_t in_progress = 0;
    bool closed = false;  // no more chunks will be handed out
    bool finalized = false;
    Status error;
};

}  // namespace

struct CopyPool::State {
    uint64_t max_chunk_runs;
    uint64_t target_chunk_bytes;
    CopyFn copy;
    CommitFn commit;
    std::mutex mutex;
    std::condition_variable cv;
    std::deque<std::shared_ptr<ActiveJob>> queue;
    bool stopping = false;

    // Under `mutex`: true when `a` can be finalized by the caller.
    static bool readyToFinalize(ActiveJob& a) {
        if (a.closed && a.in_progress == 0 && !a.finalized) {
            a.finalized = true;
            return true;
        }
        return false;
    }

    void finalize(ActiveJob& a) {
        TransferJob& job = *a.job;
        if (job.dataDone(a.error, a.next_run == a.total_runs) == TransferJob::AfterData::kSendNotification) {
            if (std::optional<Status> st = commit(a.job)) job.finish(std::move(*st));
        }
    }

    void workerLoop() {
        for (;;) {
            std::shared_ptr<ActiveJob> a;
            uint64_t first = 0, end = 0;
            {
                std::unique_lock<std::mutex> lock(mutex);
                cv.wait(lock, [&] { return stopping || !queue.empty(); });
                if (queue.empty()) return;  // stopping
                a = queue.front();
                if (stopping || a->job->abandoned() || !a->error.isOk()) a->closed = true;
                if (!a->closed) {
                    const TransferJob& job = *a->job;
                    first = a->next_run;
                    end = first;
                    uint64_t bytes = 0;
                    while (end < a->total_runs && end - first < max_chunk_runs && bytes < a->chunk_bytes) {
                        bytes += job.run(end).length;
                        ++end;
                    }
                    a->next_run = end;
                    if (end > first) ++a->in_progress;
                    if (end == a->total_runs) a->closed = true;
                }
                if (a->closed) queue.pop_front();
                if (first == end) {
                    const bool fin = readyToFinalize(*a);
                    lock.unlock();
                    if (fin) finalize(*a);
                    continue;
                }
            }
            Status st = copy(*a->job, first, end);
            bool fin = false;
            {
                std::lock_guard<std::mutex> lock(mutex);
                --a->in_progress;
                if (!st.isOk() && a->error.isOk()) {
                    a->error = std::move(st);
                    a->closed = true;  // its queue entry is dropped by the next claimer
                }
                fin = readyToFinalize(*a);
            }
            if (fin) finalize(*a);
        }
    }
};

CopyPool::CopyPool(ThreadGroup& group, unsigned threads, uint64_t max_chunk_runs, uint64_t target_chunk_bytes,
                   CopyFn copy, CommitFn commit)
    : state_(std::make_shared<State>()) {
    state_->max_chunk_runs = max_chunk_runs;
    state_->target_chunk_bytes = target_chunk_bytes;
    state_->copy = std::move(copy);
    state_->commit = std::move(commit);
    threads_ = std::max(1u, threads);
    // At engine creation: the group is open.
    for (unsigned i = 0; i < threads_; ++i) group.spawn([state = state_] { state->workerLoop(); });
}

CopyPool::~CopyPool() { stop(); }

void CopyPool::stop() {
    {
        std::lock_guard<std::mutex> lock(state_->mutex);
        state_->stopping = true;
    }
    state_->cv.notify_all();
}

Status CopyPool::submit(const std::shared_ptr<TransferJob>& job) {
    auto a = std::make_shared<ActiveJob>();
    a->job = job;
    a->total_runs = job->num_runs;
    // Aim for about two chunks per thread so a mid-sized job (one layer of a paged KV,
    // a few MiB) still spreads over every thread; never below 1 MiB per chunk, where
    // claiming would cost more than it shares.
    const uint64_t share = job->total_bytes / (2 * threads_);
    a->chunk_bytes = std::clamp<uint64_t>(share, 1 << 20, state_->target_chunk_bytes);
    const uint64_t chunk_bytes = a->chunk_bytes;
    {
        std::lock_guard<std::mutex> lock(state_->mutex);
        // Once stopping, the workers may have returned: nobody would end the job.
        if (state_->stopping) return Status::canceled("the backend is closing");
        state_->queue.push_back(std::move(a));
    }
    // Wake every worker for big jobs so they share it; one is enough for a single chunk.
    if (job->total_bytes > chunk_bytes || job->num_runs > state_->max_chunk_runs) {
        state_->cv.notify_all();
    } else {
        state_->cv.notify_one();
    }
    return Status::ok();
}

}  // namespace kvxfer
