#include "core/deadline_timer.h"

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <queue>
#include <vector>

namespace kvxfer {

struct DeadlineTimer::State {
    struct Entry {
        Clock::time_point at;
        std::weak_ptr<TransferJob> job;
        bool operator>(const Entry& o) const { return at > o.at; }
    };
    std::mutex mutex;
    std::condition_variable cv;
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
    bool stop = false;
    size_t prune_at = 1024;

    // Drops entries of jobs that are gone (ended and released long before their deadline),
    // so a high rate of short transfers with long deadlines keeps the heap small.
    void pruneIfLarge() {
        if (heap.size() < prune_at) return;
        std::vector<Entry> live;
        live.reserve(heap.size());
        while (!heap.empty()) {
            Entry e = heap.top();
            heap.pop();
            if (!e.job.expired()) live.push_back(std::move(e));
        }
        for (auto& e : live) heap.push(std::move(e));
        prune_at = std::max<size_t>(1024, 2 * heap.size());
    }

    void run() {
        std::unique_lock<std::mutex> lock(mutex);
        while (!stop) {
            if (heap.empty()) {
                cv.wait(lock);
                continue;
            }
            const auto at = heap.top().at;
            if (Clock::now() < at) {
                cv.wait_until(lock, at);
                continue;
            }
            std::weak_ptr<TransferJob> weak = std::move(const_cast<Entry&>(heap.top()).job);
            heap.pop();
            lock.unlock();
            if (auto job = weak.lock()) job->state();  // applies the deadline, pushes the cancel
            lock.lock();
        }
    }
};

DeadlineTimer::DeadlineTimer(ThreadGroup& threads) : state_(std::make_shared<State>()) {
    // Created before any backend, with the engine: the group is not closed yet.
    threads.spawn([state = state_] { state->run(); });
}

DeadlineTimer::~DeadlineTimer() { stop(); }

void DeadlineTimer::stop() {
    {
        std::lock_guard<std::mutex> lock(state_->mutex);
        state_->stop = true;
        while (!state_->heap.empty()) state_->heap.pop();
    }
    state_->cv.notify_all();
}

void DeadlineTimer::watch(const std::shared_ptr<TransferJob>& job) {
    if (job->deadline == Clock::time_point::max()) return;
    bool earliest = false;
    {
        std::lock_guard<std::mutex> lock(state_->mutex);
        if (state_->stop) return;  // closed: every job was abandoned already
        state_->pruneIfLarge();
        earliest = state_->heap.empty() || job->deadline < state_->heap.top().at;
        state_->heap.push({job->deadline, job});
    }
    if (earliest) state_->cv.notify_one();
}

}  // namespace kvxfer
