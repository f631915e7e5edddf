// The public transfer handle: what Engine::post returns and users hold. It shares the
// core's job (native/include/kvxfer/backend.h, TransferJob) but exposes only the user's
// view of it: state, error, wait, cancel, telemetry.
#pragma once

#include <memory>

#include "kvxfer/backend.h"

namespace kvxfer {

struct PlanSummary {
    uint64_t bytes = 0;
    uint64_t pieces = 0;  // blocks x layers x K/V (or extents) before coalescing
    uint64_t runs = 0;    // contiguous operations after coalescing, over every part
    uint64_t planes = 0;  // over every part
    uint32_t parts = 0;
    void add(const Plan& p) {
        bytes += p.total_bytes;
        pieces += p.num_pieces;
        runs += p.numRuns();
        planes += p.planes.size();
        ++parts;
    }
    double coalescingRatio() const {
        return runs ? static_cast<double>(pieces) / static_cast<double>(runs) : 1.0;
    }
};

class Transfer {
public:
    Transfer() = default;
    explicit Transfer(std::shared_ptr<TransferJob> job) : job_(std::move(job)) {}

    bool valid() const { return job_ != nullptr; }
    uint64_t id() const { return job_->id; }
    Op op() const { return job_->op; }
    // PENDING, DONE or FAILED; applies the deadline (never blocks).
    TransferState state() const { return job_->poll(); }
    // OK unless FAILED: then the failure (code and message).
    Status status() const { return job_->status(); }
    // Blocks until terminal or `until`, whichever is first; returns the state (kPending
    // only when `until` came first). The transfer's own deadline always ends it by then.
    TransferState wait(Clock::time_point until) const { return job_->waitUntil(until); }
    // Requests cancellation; true if this call ended it (FAILED/kCanceled). A transfer
    // whose notification is already on its way cannot be canceled.
    bool cancel() const;
    // True once no backend can touch the transfer's memory any more.
    bool quiesced() const { return job_->quiesced(); }
    Clock::time_point deadline() const { return job_->deadline; }
    TransferTelemetry telemetry() const { return job_->telemetry(); }
    PlanSummary plan() const;

    const std::shared_ptr<TransferJob>& job() const { return job_; }

private:
    std::shared_ptr<TransferJob> job_;
};

}  // namespace kvxfer
