#include "util/thread_group.h"

#include <atomic>
#include <deque>

namespace kvxfer {

namespace {

// The group the calling thread belongs to (compared, never dereferenced).
thread_local const ThreadGroup* tl_group = nullptr;

// Runs hand-offs of destroyOffGroupThreads() on a thread of no group. The thread ends when
// its queue is empty; the next hand-off (or the exit of the process) joins it.
struct Reaper {
    std::mutex mutex;
    std::deque<std::function<void()>> queue;
    bool running = false;
    bool exiting = false;  // the process is exiting: run hand-offs where they are made
    std::thread thread;

    void loop() {
        for (;;) {
            std::function<void()> fn;
            {
                std::lock_guard<std::mutex> lock(mutex);
                if (queue.empty()) {
                    running = false;
                    return;
                }
                fn = std::move(queue.front());
                queue.pop_front();
            }
            fn();
        }
    }
};

// Never destroyed: a thread may still hand off while the process exits.
Reaper& reaper() {
    static Reaper* r = new Reaper();
    return *r;
}

// Joins the reaper at exit, so that it does not run on while exit() tears statics down.
struct ReaperAtExit {
    ~ReaperAtExit() {
        Reaper& r = reaper();
        std::thread t;
        {
            std::lock_guard<std::mutex> lock(r.mutex);
            r.exiting = true;
            t = std::move(r.thread);
        }
        if (t.joinable() && t.get_id() != std::this_thread::get_id()) t.join();
    }
};

}  // namespace

struct ThreadGroup::Entry {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done = std::make_shared<std::atomic<bool>>(false);
};

ThreadGroup::~ThreadGroup() {
    joinAll();
    // Only reachable on a thread of the group, which the engine's deleter prevents
    // (destroyOffGroupThreads); never std::terminate on a joinable thread.
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& e : threads_) {
        if (e->thread.joinable()) e->thread.detach();
    }
}

bool ThreadGroup::spawn(std::function<void()> fn) {
    reapFinished();
    auto e = std::make_shared<Entry>();
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return false;
    e->thread = std::thread([group = this, done = e->done, fn = std::move(fn)]() mutable {
        tl_group = group;
        fn();
        fn = nullptr;  // what it captured goes while the thread still counts as running
        done->store(true, std::memory_order_release);
    });
    threads_.push_back(std::move(e));
    return true;
}

void ThreadGroup::close() {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
}

void ThreadGroup::reapFinished() {
    std::vector<std::shared_ptr<Entry>> finished;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        const auto self = std::this_thread::get_id();
        std::erase_if(threads_, [&](const std::shared_ptr<Entry>& e) {
            if (!e->done->load(std::memory_order_acquire) || e->thread.get_id() == self) return false;
            finished.push_back(e);
            return true;
        });
    }
    for (auto& e : finished) e->thread.join();  // returned already: at most a moment
}

void ThreadGroup::joinAll() {
    // A thread of the group cannot wait for the others: one of them may be joining it.
    if (onGroupThread()) {
        reapFinished();
        return;
    }
    std::lock_guard<std::mutex> serial(join_mutex_);
    std::vector<std::shared_ptr<Entry>> all;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        all.swap(threads_);
    }
    for (auto& e : all) e->thread.join();
}

std::thread ThreadGroup::startChild(std::function<void()> fn) {
    return std::thread([group = tl_group, fn = std::move(fn)] {
        tl_group = group;
        fn();
    });
}

bool ThreadGroup::onGroupThread() const { return tl_group == this; }

bool ThreadGroup::onAnyGroupThread() { return tl_group != nullptr; }

void ThreadGroup::destroyOffGroupThreads(std::function<void()> destroy) {
    if (!onAnyGroupThread()) {
        destroy();
        return;
    }
    static ReaperAtExit at_exit;
    Reaper& r = reaper();
    std::thread finished;
    {
        std::lock_guard<std::mutex> lock(r.mutex);
        if (r.exiting) {
            // The process is exiting: nobody would run it later.
        } else {
            r.queue.push_back(std::move(destroy));
            if (r.running) return;
            r.running = true;
            finished = std::move(r.thread);  // the previous reaper has returned (running was false)
            r.thread = std::thread([&r] { r.loop(); });
            destroy = nullptr;
        }
    }
    if (finished.joinable()) finished.join();
    if (destroy) destroy();
}

}  // namespace kvxfer
