// The core's job machine driven by the fault backend: deadlines end hung transfers on time
// (pushed to the backend), injected failures and partial completions end FAILED with their
// code and no notification, delays are honoured, and the engine keeps serving afterwards.
#include <gtest/gtest.h>

#include <cstring>
#include <numeric>

#include "kvxfer/engine.h"
#include "support/must.h"

namespace kvxfer {
namespace {

using namespace std::chrono_literals;

using testing::must;

struct FaultPair {
    std::shared_ptr<Engine> a, b;
    std::vector<uint8_t> src, dst;
    std::shared_ptr<Region> ra, rb;
    std::shared_ptr<Peer> peer;
    std::vector<int64_t> ids;
    KvLayout layout;

    explicit FaultPair(const std::string& script) {
        EngineConfig ca, cb;
        ca.name = "fa";
        cb.name = "fb";
        ca.backends = cb.backends = {"fault"};
        ca.backend.fault.script = script;
        a = must(Engine::create(ca));
        b = must(Engine::create(cb));
        layout.num_blocks = 64;
        layout.block_bytes = 256;
        layout = layout.normalized();
        src.resize(64 * 256);
        std::iota(src.begin(), src.end(), 0);
        dst.assign(64 * 256, 0);
        ra = must(a->registerMemory({src.data(), src.size(), MemoryKind::kHost, -1}, layout));
        rb = must(b->registerMemory({dst.data(), dst.size(), MemoryKind::kHost, -1}, layout));
        peer = must(a->addPeer(b->descriptor()));
        must(b->addPeer(a->descriptor()));
        ids.resize(64);
        std::iota(ids.begin(), ids.end(), 0);
    }
    ~FaultPair() {
        a->close();
        b->close();
    }
    Transfer post(std::chrono::milliseconds timeout, const std::string& note = "n") {
        TransferRequest r;
        r.op = Op::kWrite;
        r.peer = peer;
        r.parts.push_back({ra, BlockSide{{}, ids}, rb->id(), BlockSide{{}, ids}});
        r.notify.assign(note.begin(), note.end());
        r.timeout = timeout;
        r.coalesce = false;
        return must(a->post(r));
    }
};

TEST(FaultBackend, HungTransferEndsTimeoutAtItsDeadlineWithoutAnObserver) {
    FaultPair p("hang@1");
    const auto t0 = Clock::now();
    Transfer t = p.post(200ms);
    // Nobody polls: the core's deadline timer must end it and push the cancel.
    ASSERT_TRUE(t.job()->waitQuiesced(t0 + 5s));
    const auto ended = Clock::now() - t0;
    EXPECT_EQ(t.state(), TransferState::kFailed);
    EXPECT_EQ(t.status().code(), StatusCode::kTimeout);
    EXPECT_GE(ended, 200ms);
    EXPECT_LT(ended, 200ms + 100ms) << "ended " << std::chrono::duration<double>(ended).count() << " s";
    EXPECT_FALSE(p.b->waitNotification(Clock::now() + 50ms));  // no notification for a failed job
    // The next transfer (not scripted) goes through.
    Transfer ok = p.post(10s);
    EXPECT_EQ(ok.wait(Clock::now() + 10s), TransferState::kDone);
    EXPECT_EQ(p.src, p.dst);
}

TEST(FaultBackend, InjectedFailureCarriesItsCodeAndSendsNoNotification) {
    FaultPair p("fail@1=REMOTE;partial@2");
    Transfer t = p.post(10s);
    EXPECT_EQ(t.wait(Clock::now() + 10s), TransferState::kFailed);
    EXPECT_EQ(t.status().code(), StatusCode::kRemote);
    Transfer partial = p.post(10s);
    EXPECT_EQ(partial.wait(Clock::now() + 10s), TransferState::kFailed);
    EXPECT_EQ(partial.status().code(), StatusCode::kSystem);
    EXPECT_NE(partial.status().message().find("partial"), std::string::npos);
    EXPECT_FALSE(p.b->waitNotification(Clock::now() + 50ms));
    // Half the bytes landed (the partial job), the rest did not.
    EXPECT_EQ(0, std::memcmp(p.src.data(), p.dst.data(), 32 * 256));
    EXPECT_NE(0, std::memcmp(p.src.data() + 32 * 256, p.dst.data() + 32 * 256, 32 * 256));
}

TEST(FaultBackend, CancelOfAHungTransferIsPushedAndQuiesces) {
    FaultPair p("hang");
    Transfer t = p.post(60s);
    EXPECT_TRUE(t.cancel());
    EXPECT_TRUE(t.job()->waitQuiesced(Clock::now() + 1s));
    EXPECT_EQ(t.status().code(), StatusCode::kCanceled);
}

TEST(FaultBackend, DelayIsHonouredAndNotificationFollowsData) {
    FaultPair p("delay=150");
    const auto t0 = Clock::now();
    Transfer t = p.post(10s, "after-delay");
    EXPECT_EQ(t.wait(Clock::now() + 10s), TransferState::kDone);
    EXPECT_GE(Clock::now() - t0, 150ms);
    ASSERT_TRUE(p.b->waitNotification(Clock::now() + 1s));
    EXPECT_EQ(p.src, p.dst);
}

TEST(FaultBackend, DelayPastTheDeadlineEndsTimeoutAndMovesNothing) {
    FaultPair p("delay=500");
    Transfer t = p.post(100ms);
    EXPECT_EQ(t.wait(Clock::now() + 5s), TransferState::kFailed);
    EXPECT_EQ(t.status().code(), StatusCode::kTimeout);
    EXPECT_TRUE(t.job()->waitQuiesced(Clock::now() + 2s));
    EXPECT_EQ(p.dst, std::vector<uint8_t>(p.dst.size(), 0));
}

// The core's one reconnect policy: a post refused because the connection died is posted
// again on a fresh connection to the same peer instance, transparently; the stats count it
// once.
TEST(FaultBackend, DeadConnectionIsReconnectedByTheCore) {
    FaultPair p("drop@2");
    EXPECT_EQ(p.post(10s).wait(Clock::now() + 10s), TransferState::kDone);
    std::fill(p.dst.begin(), p.dst.end(), 0);
    Transfer t = p.post(10s, "after-drop");  // job 2 kills the connection; the core reconnects
    EXPECT_EQ(t.wait(Clock::now() + 10s), TransferState::kDone) << t.status().toString();
    EXPECT_EQ(p.src, p.dst);
    EXPECT_EQ(p.a->stats().transfers_posted, 2u);
    // Standalone notifications use the new connection too.
    EXPECT_TRUE(p.a->notify(*p.peer, Bytes{1}, 5s).isOk());
}

TEST(FaultBackend, MalformedScriptIsRefused) {
    EngineConfig c;
    c.name = "bad";
    c.backends = {"fault"};
    c.backend.fault.script = "explode@2";
    auto e = Engine::create(c);
    ASSERT_FALSE(e.isOk());
    EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument);
    c.backend.fault.script = "fail=NOPE";
    EXPECT_EQ(Engine::create(c).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvxfer
