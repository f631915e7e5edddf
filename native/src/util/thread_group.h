// ThreadGroup: every thread of one engine (its backends' threads and its deadline timer),
// so that Engine::close() can join them all, and so that an engine is never destroyed on
// one of them.
//
// Contract
// - spawn() starts a thread of the group; after close() it refuses (returns false and
//   does not run the function), so no thread starts behind a closing engine's back.
// - A thread that returns by itself (a finished tcp session) is joined by the next
//   spawn() or joinAll(): nothing is detached, and finished threads do not pile up.
// - joinAll() on a thread outside the group joins every thread of the group (callers are
//   serialised): when it returns, none runs any more. On a thread of the group it joins
//   only those that have returned: a thread cannot join itself, and another may be
//   joining it; the caller stays in the group for a later joinAll() from outside.
// - onGroupThread() / onAnyGroupThread() tell whether the calling thread is one of this
//   group's / of any group's (a thread-local mark), so the engine can avoid joining itself.
// - destroyOffGroupThreads() runs a destruction (the engine's) on a thread that belongs to
//   no group: at once when the caller is such a thread, else on a short-lived process-wide
//   reaper thread, which ends when it has nothing left to do and is joined by the next
//   hand-off or at exit. So an engine's destructor can always join all of its threads.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvxfer {

class ThreadGroup {
public:
    ThreadGroup() = default;
    ~ThreadGroup();  // joins what joinAll() did not (never on a group thread: see above)
    ThreadGroup(const ThreadGroup&) = delete;
    ThreadGroup& operator=(const ThreadGroup&) = delete;

    bool spawn(std::function<void()> fn);
    void close();  // refuse new threads from now on
    void joinAll();

    bool onGroupThread() const;
    static bool onAnyGroupThread();

    static void destroyOffGroupThreads(std::function<void()> destroy);

    // For a thread of a group that runs a pool of its own (tcp's inbound workers): starts a
    // child thread that counts as a thread of the caller's group; the caller joins it
    // before it returns, so the group's join covers it.
    static std::thread startChild(std::function<void()> fn);

private:
    struct Entry;
    // Joins the threads that have returned (outside `mutex_`).
    void reapFinished();

    mutable std::mutex mutex_;
    bool closed_ = false;
    std::vector<std::shared_ptr<Entry>> threads_;
    std::mutex join_mutex_;  // one joinAll() at a time
};

}  // namespace kvxfer
