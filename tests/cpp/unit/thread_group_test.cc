// ThreadGroup (native/src/util/thread_group.h): the engine's threads, joined by close(),
// and the hand-off that keeps an engine's destructor off its own threads.
#include "util/thread_group.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>

namespace kvxfer {
namespace {

using namespace std::chrono_literals;

TEST(ThreadGroup, JoinAllWaitsForEveryThreadAndSpawnIsRefusedAfterClose) {
    ThreadGroup group;
    std::atomic<bool> stop{false};
    std::atomic<int> ended{0};
    for (int i = 0; i < 4; ++i) {
        ASSERT_TRUE(group.spawn([&] {
            while (!stop.load()) std::this_thread::sleep_for(1ms);
            std::this_thread::sleep_for(20ms);  // still running when joinAll() starts
            ++ended;
        }));
    }
    EXPECT_FALSE(group.onGroupThread());
    group.close();
    bool ran = false;
    EXPECT_FALSE(group.spawn([&] { ran = true; }));
    stop = true;
    group.joinAll();
    EXPECT_EQ(ended.load(), 4);
    EXPECT_FALSE(ran);
}

TEST(ThreadGroup, ThreadsKnowTheirGroup) {
    ThreadGroup a, b;
    std::atomic<int> in_a{-1}, in_b{-1}, in_any{-1};
    ASSERT_TRUE(a.spawn([&] {
        in_a = a.onGroupThread();
        in_b = b.onGroupThread();
        in_any = ThreadGroup::onAnyGroupThread();
    }));
    a.joinAll();
    EXPECT_EQ(in_a.load(), 1);
    EXPECT_EQ(in_b.load(), 0);
    EXPECT_EQ(in_any.load(), 1);
    EXPECT_FALSE(ThreadGroup::onAnyGroupThread());
}

// joinAll() on a thread of the group neither joins itself nor waits for the others; the
// application's joinAll() later joins that thread too.
TEST(ThreadGroup, JoinAllOnAGroupThreadDoesNotJoinItself) {
    ThreadGroup group;
    std::atomic<bool> inner_returned{false}, release{false};
    ASSERT_TRUE(group.spawn([&] {
        while (!release.load()) std::this_thread::sleep_for(1ms);
    }));
    ASSERT_TRUE(group.spawn([&] {
        group.joinAll();  // the other thread still runs: must not wait for it
        inner_returned = true;
    }));
    const auto until = std::chrono::steady_clock::now() + 30s;
    while (!inner_returned.load() && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(1ms);
    EXPECT_TRUE(inner_returned.load());
    release = true;
    group.joinAll();
}

// A destruction reached on a group thread runs on a thread of no group (so it may join the
// group), and not on the caller; reached elsewhere it runs at once, on the caller.
TEST(ThreadGroup, DestroyOffGroupThreadsNeverRunsOnAGroupThread) {
    std::thread::id here = std::this_thread::get_id(), ran_on;
    bool ran_in_group = true;
    ThreadGroup::destroyOffGroupThreads([&] {
        ran_on = std::this_thread::get_id();
        ran_in_group = ThreadGroup::onAnyGroupThread();
    });
    EXPECT_EQ(ran_on, here);
    EXPECT_FALSE(ran_in_group);

    auto group = std::make_unique<ThreadGroup>();
    std::mutex m;
    std::condition_variable cv;
    bool done = false, in_group = true, on_caller = true;
    ASSERT_TRUE(group->spawn([&] {
        const auto caller = std::this_thread::get_id();
        ThreadGroup::destroyOffGroupThreads([&, caller] {
            group->joinAll();  // joins the caller: fine, it is not this thread
            group.reset();
            std::lock_guard<std::mutex> lock(m);
            in_group = ThreadGroup::onAnyGroupThread();
            on_caller = std::this_thread::get_id() == caller;
            done = true;
            cv.notify_all();
        });
    }));
    std::unique_lock<std::mutex> lock(m);
    ASSERT_TRUE(cv.wait_for(lock, 30s, [&] { return done; }));
    EXPECT_FALSE(in_group);
    EXPECT_FALSE(on_caller);
}

}  // namespace
}  // namespace kvxfer
