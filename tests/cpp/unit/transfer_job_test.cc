// The transfer state machine: exactly one terminal state; deadlines and cancel are
// terminal at once; a committing job can only be ended by its backend.
#include <gtest/gtest.h>

#include <thread>

#include "kvxfer/backend.h"

namespace kvxfer {
namespace {

// Counts the cancellations the job machine pushes to its backend.
class CountingBackend final : public Backend {
public:
    int cancels = 0;
    std::string_view name() const override { return "counting"; }
    const BackendCaps& caps() const override { return caps_; }
    Bytes endpointInfo() const override { return {}; }
    Result<std::unique_ptr<BackendRegion>> registerMemory(const MemorySpan&) override {
        return Status::unsupported("test");
    }
    Result<std::shared_ptr<BackendPeer>> connect(const PeerIdentity&, ByteView, Clock::time_point) override {
        return Status::unsupported("test");
    }
    Result<std::unique_ptr<BackendRemoteRegion>> importRemoteRegion(BackendPeer&, const RegionDescriptor&,
                                                                    ByteView) override {
        return Status::unsupported("test");
    }
    Status submit(const std::shared_ptr<TransferJob>&) override { return Status::ok(); }
    void cancel(TransferJob&) override { ++cancels; }
    Status notify(BackendPeer&, ByteView, Clock::time_point) override { return Status::ok(); }

private:
    BackendCaps caps_;
};

std::shared_ptr<TransferJob> makeJob(std::chrono::milliseconds timeout = std::chrono::hours(1)) {
    auto j = std::make_shared<TransferJob>();
    j->deadline = Clock::now() + timeout;
    return j;
}

TEST(TransferJob, FinishOkIsDone) {
    auto j = makeJob();
    EXPECT_EQ(j->state(), TransferState::kPending);
    j->finish(Status::ok());
    EXPECT_EQ(j->state(), TransferState::kDone);
    EXPECT_TRUE(j->quiesced());
    j->finish(Status::system("late"));  // ignored: already terminal
    EXPECT_EQ(j->state(), TransferState::kDone);
}

TEST(TransferJob, DeadlineFailsWithoutBackend) {
    auto j = makeJob(std::chrono::milliseconds(20));
    const auto t0 = Clock::now();
    EXPECT_EQ(j->waitUntil(Clock::time_point::max()), TransferState::kFailed);
    EXPECT_LT(Clock::now() - t0, std::chrono::seconds(2));
    EXPECT_EQ(j->status().code(), StatusCode::kTimeout);
    EXPECT_TRUE(j->abandoned());
    EXPECT_FALSE(j->commitNow());
    EXPECT_FALSE(j->quiesced());  // the backend has not let go yet
    j->finish(Status::ok());      // late success does not resurrect it
    EXPECT_EQ(j->state(), TransferState::kFailed);
    EXPECT_TRUE(j->quiesced());
}

TEST(TransferJob, LateFinishWithoutObserverStillTimesOut) {
    auto j = makeJob(std::chrono::milliseconds(5));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // nobody polls meanwhile
    j->finish(Status::canceled("backend stopped"));
    EXPECT_EQ(j->state(), TransferState::kFailed);
    EXPECT_EQ(j->status().code(), StatusCode::kTimeout);
    // Committed before its deadline (notification on its way) but acknowledged after it: a
    // hung peer must not hold a transfer past its deadline, so it ends TIMEOUT, and says the
    // peer may have received the notification.
    auto k = makeJob(std::chrono::milliseconds(5));
    ASSERT_TRUE(k->commitNow());
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    k->finish(Status::ok());
    EXPECT_EQ(k->state(), TransferState::kFailed);
    EXPECT_EQ(k->status().code(), StatusCode::kTimeout);
    EXPECT_NE(k->status().message().find("may have received"), std::string::npos);
    EXPECT_TRUE(k->quiesced());
}

TEST(TransferJob, CancelIsPushedToTheBackendOnce) {
    auto j = makeJob();
    CountingBackend backend;
    j->backend = &backend;
    EXPECT_TRUE(j->abandon(Status::canceled("x")));
    EXPECT_FALSE(j->abandon(Status::canceled("again")));
    EXPECT_EQ(backend.cancels, 1);
    EXPECT_EQ(j->state(), TransferState::kFailed);
    EXPECT_EQ(j->status().code(), StatusCode::kCanceled);
}

TEST(TransferJob, CommittingCannotBeCanceled) {
    auto j = makeJob();
    ASSERT_TRUE(j->commitNow());
    EXPECT_FALSE(j->abandon(Status::canceled("too late")));
    EXPECT_EQ(j->state(), TransferState::kPending);
    j->finish(Status::ok());
    EXPECT_EQ(j->state(), TransferState::kDone);
}

TEST(TransferJob, WaitWakesOnFinishFromAnotherThread) {
    auto j = makeJob();
    std::thread t([j] {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        j->finish(Status::peerUnreachable("gone"));
    });
    EXPECT_EQ(j->waitUntil(Clock::now() + std::chrono::seconds(10)), TransferState::kFailed);
    EXPECT_EQ(j->status().code(), StatusCode::kPeerUnreachable);
    t.join();
}

TEST(TransferJob, DataDoneDecidesTheRest) {
    {  // error: failed with it
        auto j = makeJob();
        EXPECT_EQ(j->dataDone(Status::remote("bad rkey"), false), TransferJob::AfterData::kFinished);
        EXPECT_EQ(j->state(), TransferState::kFailed);
        EXPECT_EQ(j->status().code(), StatusCode::kRemote);
    }
    {  // everything moved, no notification: DONE
        auto j = makeJob();
        EXPECT_EQ(j->dataDone(Status::ok(), true), TransferJob::AfterData::kFinished);
        EXPECT_EQ(j->state(), TransferState::kDone);
    }
    {  // a notification: committing, the backend sends it and finishes
        auto j = makeJob();
        j->notify = {1};
        EXPECT_EQ(j->dataDone(Status::ok(), true), TransferJob::AfterData::kSendNotification);
        EXPECT_EQ(j->state(), TransferState::kPending);
        EXPECT_FALSE(j->abandon(Status::canceled("late")));
        j->finish(Status::ok());
        EXPECT_EQ(j->state(), TransferState::kDone);
    }
    {  // stopped early: canceled, never DONE
        auto j = makeJob();
        j->notify = {1};
        EXPECT_EQ(j->dataDone(Status::ok(), false), TransferJob::AfterData::kFinished);
        EXPECT_EQ(j->state(), TransferState::kFailed);
        EXPECT_EQ(j->status().code(), StatusCode::kCanceled);
    }
    {  // abandoned while the data moved: no notification goes out
        auto j = makeJob();
        j->notify = {1};
        j->abandon(Status::canceled("user"));
        EXPECT_EQ(j->dataDone(Status::ok(), true), TransferJob::AfterData::kFinished);
        EXPECT_EQ(j->status().code(), StatusCode::kCanceled);
        EXPECT_TRUE(j->quiesced());
    }
}

TEST(TransferJob, RunsAcrossPartsAreFlattenedInOrder) {
    auto j = makeJob();
    auto plan = std::make_shared<Plan>();
    plan->runs = {{0, 100, 10}, {50, 200, 5}};
    plan->planes = {{0, 0}, {1000, 2000}};
    std::vector<uint8_t> a(4096), b(4096);
    JobPart p0{plan, {1, a.data(), a.size()}, {7, 0x10000, 4096}, 0};
    JobPart p1{plan, {2, b.data(), b.size()}, {8, 0x20000, 4096}, 4};
    j->parts = {p0, p1};
    j->num_runs = 8;
    EXPECT_EQ(j->partOf(3), 0u);
    EXPECT_EQ(j->partOf(4), 1u);
    const FlatRun r = j->run(6);  // part 1, plane 1, run 0
    EXPECT_EQ(r.part, 1u);
    EXPECT_EQ(r.local, b.data() + 1000);
    EXPECT_EQ(r.remote_address, 0x20000u + 2000 + 100);
    EXPECT_EQ(r.length, 10u);
}

}  // namespace
}  // namespace kvxfer
