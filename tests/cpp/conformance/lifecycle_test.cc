// The engine's close() and destruction contract (engine.h, "Close contract"), for every
// backend this build can start: after close() returns on a thread of no engine, no thread
// of the engine runs any more and every transfer has ended and been let go of; close()
// from a callback on one of the engine's own threads neither deadlocks nor joins itself;
// and the last reference dropped on a backend thread leaves no thread behind.
// Threads are counted in /proc/self/task: this binary starts no other thread.
#include <dirent.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <thread>

#include "kvxfer/engine.h"
#include "support/must.h"

namespace kvxfer {
namespace {

using namespace std::chrono_literals;
using testing::must;

size_t threadCount() {
    size_t n = 0;
    DIR* d = ::opendir("/proc/self/task");
    if (d == nullptr) return 0;
    while (const dirent* e = ::readdir(d)) {
        if (e->d_name[0] != '.') ++n;
    }
    ::closedir(d);
    return n;
}

// Polls until the count is at most `want` or the deadline passes; returns the last count.
size_t threadCountWithin(size_t want, std::chrono::milliseconds within) {
    const auto until = Clock::now() + within;
    size_t n = threadCount();
    while (n > want && Clock::now() < until) {
        std::this_thread::sleep_for(5ms);
        n = threadCount();
    }
    return n;
}

// The count right after a join: the kernel drops a thread's /proc entry a moment after the
// join returns (it wakes the joiner first), so a loaded machine gets a short grace. A
// thread that still runs (what this file checks for) stays far longer.
size_t threadCountAfterJoin(size_t want) { return threadCountWithin(want, 2s); }

std::vector<std::string> backendsHere() {
    std::vector<std::string> out;
    for (const auto& b : listBackends()) out.push_back(b.name);
    return out;
}

// 32 MiB in 64 blocks: large enough that a transfer is still moving (on a backend thread)
// when the test lets go of it right after the post.
constexpr uint64_t kBlocks = 64;
constexpr uint64_t kBlockBytes = 512 << 10;

KvLayout layout() {
    KvLayout l;
    l.num_layers = 1;
    l.num_kv = 1;
    l.num_blocks = kBlocks;
    l.block_bytes = kBlockBytes;
    return l.normalized();
}

class Lifecycle : public ::testing::TestWithParam<std::string> {
protected:
    void SetUp() override {
        if (GetParam() == "cuda_ipc") GTEST_SKIP() << "cuda_ipc moves GPU memory only (tests/gpu covers it)";
        for (const auto& b : listBackends()) {
            if (b.name == GetParam() && !b.available)
                GTEST_SKIP() << GetParam() << " unavailable: " << b.reason;
        }
        // A sanitizer's runtime starts a thread of its own with the first thread: not ours.
        std::thread([] {}).join();
        baseline_ = threadCount();
        ids_.resize(kBlocks);
        for (uint64_t i = 0; i < kBlocks; ++i) ids_[i] = static_cast<int64_t>(i);
    }

    std::shared_ptr<Engine> engine(const std::string& name) {
        EngineConfig c;
        c.name = name;
        c.backends = {GetParam()};
        c.default_timeout = 60s;
        return must(Engine::create(c));
    }

    // A region over `memory` whose owner runs `on_release` when the region's last reference
    // goes (on whichever thread drops it).
    std::shared_ptr<Region> region(Engine& e, std::vector<uint8_t>& memory,
                                   std::function<void()> on_release) {
        memory.assign(kBlocks * kBlockBytes, 7);
        std::shared_ptr<void> owner(static_cast<void*>(nullptr), [fn = std::move(on_release)](void*) {
            if (fn) fn();
        });
        return must(e.registerMemory({memory.data(), memory.size(), MemoryKind::kHost, -1}, layout(), owner));
    }

    TransferRequest writeAll(const std::shared_ptr<Peer>& peer, const std::shared_ptr<Region>& local) {
        TransferRequest r;
        r.op = Op::kWrite;
        r.peer = peer;
        r.parts.push_back({local, BlockSide{{}, ids_}, 0, BlockSide{{}, ids_}});
        r.notify = {'x'};
        return r;
    }

    size_t baseline_ = 0;
    std::vector<int64_t> ids_;
};

// close() joins every thread of the engine before it returns, while the application still
// holds the engine, its regions, peers and transfers; every transfer has ended and its
// backend has let go of it.
TEST_P(Lifecycle, CloseJoinsEveryThreadAndEndsEveryTransfer) {
    std::vector<uint8_t> ma, mb;
    auto a = engine("a");
    auto b = engine("b");
    auto ra = region(*a, ma, nullptr);
    auto rb = region(*b, mb, nullptr);
    auto peer = must(a->addPeer(b->descriptor()));
    must(b->addPeer(a->descriptor()));
    ASSERT_GT(threadCount(), baseline_) << "the engines started no thread: this test checks nothing";
    Transfer done = must(a->post(writeAll(peer, ra)));
    ASSERT_EQ(done.wait(Clock::now() + 60s), TransferState::kDone) << done.status().toString();
    std::vector<Transfer> moving;
    for (int i = 0; i < 8; ++i) moving.push_back(must(a->post(writeAll(peer, ra))));

    a->close();
    b->close();
    EXPECT_EQ(threadCountAfterJoin(baseline_), baseline_) << "threads of closed engines still run";
    for (auto& t : moving) {
        EXPECT_NE(t.state(), TransferState::kPending);
        EXPECT_TRUE(t.quiesced()) << "a backend still holds transfer " << t.id() << " after close()";
    }
    // Closing again, from any thread, is a no-op.
    std::thread again([&] { a->close(); });
    again.join();
    a->close();
    EXPECT_EQ(threadCountAfterJoin(baseline_), baseline_);
}

// close() called by two application threads at once: neither returns before every thread
// of the engine is joined.
TEST_P(Lifecycle, ConcurrentClosesBothWaitForTheJoin) {
    std::vector<uint8_t> ma, mb;
    auto a = engine("a");
    auto b = engine("b");
    auto ra = region(*a, ma, nullptr);
    auto rb = region(*b, mb, nullptr);
    auto peer = must(a->addPeer(b->descriptor()));
    must(b->addPeer(a->descriptor()));
    for (int i = 0; i < 4; ++i) must(a->post(writeAll(peer, ra)));
    b->close();  // a's transfers fail now or end; a still runs its threads
    std::atomic<size_t> after_first{0}, after_second{0};
    std::thread first([&] {
        a->close();
        after_first = threadCountAfterJoin(baseline_ + 2);
    });
    std::thread second([&] {
        a->close();
        after_second = threadCountAfterJoin(baseline_ + 2);
    });
    first.join();
    second.join();
    // Each closer counted itself and possibly the other closer, never an engine thread.
    EXPECT_LE(after_first.load(), baseline_ + 2);
    EXPECT_LE(after_second.load(), baseline_ + 2);
    EXPECT_EQ(threadCountAfterJoin(baseline_), baseline_);
}

// A region's owner released on a backend thread (the last job holding the region ends
// there) calls close() on its engine: a callback into user code on one of the engine's own
// threads. close() must return there (no self-join, no deadlock); the next close() from
// the application joins every thread, the one that ran the callback included.
TEST_P(Lifecycle, CloseFromACallbackOnABackendThread) {
    bool on_backend_thread = false;
    for (int attempt = 0; attempt < 20 && !on_backend_thread; ++attempt) {
        std::vector<uint8_t> ma, mb;
        auto a = engine("a");
        auto b = engine("b");
        std::weak_ptr<Engine> weak_a = a;
        const auto main_thread = std::this_thread::get_id();
        struct Seen {
            std::atomic<bool> ran{false}, closed{false}, elsewhere{false};
        };
        auto seen = std::make_shared<Seen>();
        auto ra = region(*a, ma, [weak_a, seen, main_thread] {
            if (auto e = weak_a.lock()) {
                e->close();
                seen->closed = e->closed();
            }
            seen->elsewhere = std::this_thread::get_id() != main_thread;
            seen->ran = true;
        });
        auto rb = region(*b, mb, nullptr);
        auto peer = must(a->addPeer(b->descriptor()));
        must(b->addPeer(a->descriptor()));
        {
            Transfer t = must(a->post(writeAll(peer, ra)));
            ra.reset();  // the transfer's job holds the region now; dropped where it ends
        }
        const auto until = Clock::now() + 60s;
        while (!seen->ran && Clock::now() < until) std::this_thread::sleep_for(1ms);
        ASSERT_TRUE(seen->ran) << "the region's owner was never released";
        ASSERT_TRUE(seen->closed) << "close() in the callback did not close the engine";
        on_backend_thread = seen->elsewhere;
        a->close();  // the application's close: joins what the callback's close could not
        b->close();
        EXPECT_EQ(threadCountAfterJoin(baseline_), baseline_) << "threads of closed engines still run";
    }
    EXPECT_TRUE(on_backend_thread) << "in 20 attempts the transfer always ended before the post returned: "
                                      "the callback never ran on a backend thread";
}

// The application lets go of everything while a transfer is in flight, and the peer was
// removed (so the engine holds no peer and needs no close()): the last reference to the
// engine goes when the backend lets go of the transfer, on one of the engine's own threads.
// The engine is then destroyed elsewhere and every thread of it joined.
TEST_P(Lifecycle, LastReferenceDroppedOnABackendThread) {
    bool on_backend_thread = false;
    for (int attempt = 0; attempt < 20 && !on_backend_thread; ++attempt) {
        std::vector<uint8_t> ma, mb;
        auto b = engine("b");
        auto rb = region(*b, mb, nullptr);
        const auto main_thread = std::this_thread::get_id();
        auto released_elsewhere = std::make_shared<std::atomic<int>>(-1);
        std::weak_ptr<Engine> weak_a;
        {
            auto a = engine("a");
            weak_a = a;
            auto ra = region(*a, ma, [released_elsewhere, main_thread] {
                *released_elsewhere = std::this_thread::get_id() != main_thread ? 1 : 0;
            });
            auto peer = must(a->addPeer(b->descriptor()));
            Transfer t = must(a->post(writeAll(peer, ra)));
            ASSERT_TRUE(a->removePeer("b").isOk());  // abandons it; the backend still holds it until it stops
        }
        const auto until = Clock::now() + 60s;
        while (!weak_a.expired() && Clock::now() < until) std::this_thread::sleep_for(1ms);
        ASSERT_TRUE(weak_a.expired()) << "engine a was never released";
        on_backend_thread = released_elsewhere->load() == 1;
        b->close();  // b's threads are joined here (its tcp workers grew when a connected)
        EXPECT_EQ(threadCountWithin(baseline_, 10s), baseline_)
            << "a thread of the released engine still runs";
    }
    EXPECT_TRUE(on_backend_thread) << "in 20 attempts the transfer always ended on the application's thread";
}

INSTANTIATE_TEST_SUITE_P(AllBackends, Lifecycle, ::testing::ValuesIn(backendsHere()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace kvxfer
