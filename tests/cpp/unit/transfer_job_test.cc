// The transfer state machine: exactly one terminal state; deadlines and cancel are
// terminal at once; a committing job can only be ended by its backend.
#include <gtest/gtest.h>

#include <thread>

#include "kvxfer/backend.h"

namespace kvxfer {
namespace {

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
    EXPECT_FALSE(j->beginCommit());
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
    auto k = makeJob(std::chrono::milliseconds(5));
    ASSERT_TRUE(k->beginCommit());  // committed before its deadline: may finish late
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    k->finish(Status::ok());
    EXPECT_EQ(k->state(), TransferState::kDone);
}

TEST(TransferJob, CancelCallsHookOnce) {
    auto j = makeJob();
    int hooks = 0;
    j->on_abandon = [&](TransferJob&) { ++hooks; };
    EXPECT_TRUE(j->abandon(Status::canceled("x")));
    EXPECT_FALSE(j->abandon(Status::canceled("again")));
    EXPECT_EQ(hooks, 1);
    EXPECT_EQ(j->state(), TransferState::kFailed);
    EXPECT_EQ(j->status().code(), StatusCode::kCanceled);
}

TEST(TransferJob, CommittingCannotBeCanceled) {
    auto j = makeJob();
    ASSERT_TRUE(j->beginCommit());
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

}  // namespace
}  // namespace kvxfer
