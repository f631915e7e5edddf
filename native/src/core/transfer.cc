// The transfer job machine: the one place that decides a transfer's life.
//
//   RUNNING --dataDone(ok, notify)--> COMMITTING --finish--> DONE | FAILED
//      |  \--dataDone(ok, no notify)--> DONE          (finish by the backend)
//      |--dataDone(error) / abandon / deadline--> FAILED
//
// abandon() (cancel, deadline, peer removed, engine closed) makes the job terminal at
// once and pushes the cancellation to the backend; the backend still calls finish() when
// nothing of the job is in flight any more, which is when the job becomes "quiesced".
// A committing job (its notification on the way) can only be ended by its backend: the
// peer may already have the notification, so the outcome must be the backend's.
#include "kvxfer/transfer.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "kvxfer/backend.h"

namespace kvxfer {

const char* statusCodeName(StatusCode code) {
    switch (code) {
        case StatusCode::kOk:
            return "OK";
        case StatusCode::kInvalidArgument:
            return "INVALID_ARGUMENT";
        case StatusCode::kOutOfRange:
            return "OUT_OF_RANGE";
        case StatusCode::kNotFound:
            return "NOT_FOUND";
        case StatusCode::kUnsupported:
            return "UNSUPPORTED";
        case StatusCode::kSystem:
            return "SYSTEM";
        case StatusCode::kPeerUnreachable:
            return "PEER_UNREACHABLE";
        case StatusCode::kRemote:
            return "REMOTE";
        case StatusCode::kTimeout:
            return "TIMEOUT";
        case StatusCode::kCanceled:
            return "CANCELED";
        case StatusCode::kBadDescriptor:
            return "BAD_DESCRIPTOR";
        case StatusCode::kInternal:
            return "INTERNAL";
        case StatusCode::kBackPressure:
            return "BACK_PRESSURE";
    }
    return "UNKNOWN";
}

Status Status::systemErrno(const std::string& what, int err) {
    return {StatusCode::kSystem, what + ": " + std::strerror(err) + " (errno " + std::to_string(err) + ")"};
}

std::string Status::toString() const {
    if (isOk()) return "OK";
    return std::string(statusCodeName(code_)) + ": " + message_;
}

namespace {

constexpr auto kWaitSpin = std::chrono::microseconds(3);
// With an expected completion time (expectDataAt): wake this long before it (a timed
// sleep overshoots by a wake-up), and spin at most this long past it before sleeping.
constexpr auto kEtaLead = std::chrono::microseconds(150);
constexpr auto kEtaSpin = std::chrono::microseconds(500);

inline void cpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

}  // namespace

const char* opName(Op op) { return op == Op::kWrite ? "WRITE" : "READ"; }

const char* memoryKindName(MemoryKind kind) {
    switch (kind) {
        case MemoryKind::kHost:
            return "host";
        case MemoryKind::kHostShareable:
            return "host-shareable";
        case MemoryKind::kCuda:
            return "cuda";
    }
    return "unknown";
}

uint32_t TransferJob::partOf(uint64_t i) const {
    if (parts.size() == 1) return 0;
    // The last part whose first_run <= i.
    auto it = std::upper_bound(parts.begin(), parts.end(), i,
                               [](uint64_t v, const JobPart& p) { return v < p.first_run; });
    return static_cast<uint32_t>(std::distance(parts.begin(), it) - 1);
}

FlatRun TransferJob::run(uint64_t i) const {
    const uint32_t pi = partOf(i);
    const JobPart& p = parts[pi];
    const Run r = p.plan->flatRun(i - p.first_run);
    return {pi,
            p.local.base + r.local_offset,
            r.local_offset,
            p.remote.base_address + r.remote_offset,
            r.remote_offset,
            r.length};
}

bool TransferJob::toTerminal(Internal to, Status status, bool from_backend, Clock::time_point now) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        const uint8_t cur = state_.load(std::memory_order_acquire);
        if (cur == kOk || cur == kFail) return false;
        // A committing job ends by its backend, or by its deadline: a hung peer must not
        // hold a transfer past it (the notification may then have reached the peer).
        if (cur == kCommitting && !from_backend) {
            if (Clock::now() < deadline) return false;
            status = Status::timeout("transfer " + std::to_string(id) +
                                     " missed its deadline while its notification was being delivered "
                                     "(the peer may have received it)");
        }
        status_ = std::move(status);
        telemetry_.finished = now == Clock::time_point{} ? Clock::now() : now;
        if (on_terminal) on_terminal(*this, to == kOk);
        state_.store(to, std::memory_order_release);
    }
    cv_.notify_all();
    return true;
}

void TransferJob::expireIfDue(Clock::time_point now) {
    const uint8_t s = state_.load(std::memory_order_acquire);
    if ((s == kRunning || s == kCommitting) && now >= deadline) {
        abandon(Status::timeout("transfer " + std::to_string(id) + " missed its deadline"));
    }
}

bool TransferJob::abandoned() const {
    const uint8_t s = state_.load(std::memory_order_acquire);
    return s == kFail || ((s == kRunning || s == kCommitting) && Clock::now() >= deadline);
}

bool TransferJob::commitNow() { return commitAt(Clock::now()); }

bool TransferJob::commitAt(Clock::time_point now) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (state_.load(std::memory_order_acquire) != kRunning || now >= deadline) return false;
    if (telemetry_.data_done == Clock::time_point{}) telemetry_.data_done = now;
    state_.store(kCommitting, std::memory_order_release);
    return true;
}

TransferJob::AfterData TransferJob::decideAfterData(Status status, bool all_moved, Status* finish_with) {
    // One clock read serves the telemetry and the deadline checks (a small transfer's
    // whole life is a few microseconds; clock reads are a visible part of it).
    const auto now = Clock::now();
    {
        std::lock_guard<std::mutex> lock(mutex_);
        telemetry_.data_done = now;
    }
    const uint8_t s = state_.load(std::memory_order_acquire);
    const bool gone = s == kFail || (s == kRunning && now >= deadline);
    if (!status.isOk()) {
        *finish_with = std::move(status);
    } else if (!all_moved || gone) {
        *finish_with = Status::canceled("transfer abandoned before all bytes moved");
    } else if (notify.empty()) {
        *finish_with = Status::ok();
    } else if (commitAt(now)) {
        return AfterData::kSendNotification;
    } else {
        *finish_with = Status::canceled("transfer abandoned before its notification was sent");
    }
    return AfterData::kFinished;
}

TransferJob::AfterData TransferJob::dataDone(Status status, bool all_moved) {
    Status finish_with;
    const AfterData next = decideAfterData(std::move(status), all_moved, &finish_with);
    if (next == AfterData::kFinished) finish(std::move(finish_with));
    return next;
}

void TransferJob::finish(Status status) {
    // The outcome must not depend on whether anyone observed the job before its
    // deadline: a job still running past it ends TIMEOUT, as a poll would have said.
    const auto now = Clock::now();
    expireIfDue(now);
    {
        std::lock_guard<std::mutex> lock(mutex_);
        // Backends that never report their data phase separately (an ACK ends both).
        if (telemetry_.data_done == Clock::time_point{}) telemetry_.data_done = now;
        finished_.store(true, std::memory_order_release);
    }
    if (status.isOk()) {
        toTerminal(kOk, Status::ok(), true, now);
    } else {
        toTerminal(kFail, std::move(status), true, now);
    }
    cv_.notify_all();  // waitQuiesced() waiters
}

bool TransferJob::abandon(Status why) {
    if (!toTerminal(kFail, std::move(why), false)) return false;
    if (backend != nullptr && !finished_.load(std::memory_order_acquire)) backend->cancel(*this);
    return true;
}

TransferState TransferJob::poll() {
    // Polling drives an inline job too: one non-blocking look (Progress, backend.h).
    if (progress != nullptr && !finished_.load(std::memory_order_acquire)) {
        progress->drive(*this, Clock::time_point{});
    }
    return state();
}

TransferState TransferJob::state() {
    const uint8_t s = state_.load(std::memory_order_acquire);
    if (s == kOk) return TransferState::kDone;  // terminal: no clock needed
    if (s == kFail) return TransferState::kFailed;
    expireIfDue(Clock::now());
    switch (state_.load(std::memory_order_acquire)) {
        case kOk:
            return TransferState::kDone;
        case kFail:
            return TransferState::kFailed;
        default:
            return TransferState::kPending;
    }
}

Status TransferJob::status() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return status_;
}

TransferState TransferJob::waitUntil(Clock::time_point until) {
    // Finished already (the inline path): no lock, no clock.
    const uint8_t now_state = state_.load(std::memory_order_acquire);
    if (now_state == kOk) return TransferState::kDone;
    if (now_state == kFail) return TransferState::kFailed;
    // The backend may let this thread complete the job itself (Progress, backend.h).
    if (progress != nullptr) {
        progress->drive(*this, std::min(until, deadline));
        const uint8_t s = state_.load(std::memory_order_acquire);
        if (s == kOk || s == kFail) return state();
    }
    // A short bounded spin before sleeping: a small transfer on another thread usually
    // ends within a few microseconds, far less than a futex sleep and wake-up cost.
    const auto spin_until = std::min(until, Clock::now() + kWaitSpin);
    for (int i = 0;; ++i) {
        const uint8_t s = state_.load(std::memory_order_acquire);
        if (s == kOk || s == kFail) return state();
        if ((i & 15) == 15 && Clock::now() >= spin_until) break;
        cpuRelax();
    }
    // Then sleep, in slices of at most a day: condition variables overflow on time points
    // centuries away (a saturated timeout) and would return at once. The deadline ends
    // the job in every state (state() applies it), so waiting until it is enough.
    // Once the backend says when it expects the data (expectDataAt, which wakes this
    // sleep), sleep only until shortly before that and spin through it, bounded: a thread
    // woken by the completion would pay a wake-up (tens of microseconds in a VM).
    constexpr auto kSlice = std::chrono::hours(24);
    bool eta_used = false;
    for (;;) {
        if (const Clock::rep eta_ns = expected_ns_.load(std::memory_order_acquire);
            eta_ns != 0 && !eta_used) {
            eta_used = true;
            const Clock::time_point eta{Clock::duration(eta_ns)};
            const auto wake = std::min({eta - kEtaLead, until, deadline});
            if (Clock::now() < wake) {
                std::unique_lock<std::mutex> lock(mutex_);
                cv_.wait_until(lock, wake, [&] {
                    const uint8_t s = state_.load(std::memory_order_acquire);
                    return s == kOk || s == kFail;
                });
            }
            const auto spin_end = std::min(until, std::max(Clock::now(), eta) + kEtaSpin);
            for (int i = 0;; ++i) {
                const uint8_t s = state_.load(std::memory_order_acquire);
                if (s == kOk || s == kFail) return state();
                if ((i & 63) == 63 && Clock::now() >= spin_end) break;
                cpuRelax();
            }
        }
        {
            std::unique_lock<std::mutex> lock(mutex_);
            const auto now = Clock::now();
            auto stop = std::min(until, deadline);
            if (stop - now > kSlice) stop = now + kSlice;
            cv_.wait_until(lock, stop, [&] {
                const uint8_t s = state_.load(std::memory_order_acquire);
                return s == kOk || s == kFail ||
                       (!eta_used && expected_ns_.load(std::memory_order_acquire) != 0);
            });
        }
        const TransferState s = state();
        if (s != TransferState::kPending || Clock::now() >= until) return s;
    }
}

void TransferJob::expectDataAt(Clock::time_point t) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        expected_ns_.store(t.time_since_epoch().count(), std::memory_order_release);
    }
    cv_.notify_all();
}

bool TransferJob::waitQuiesced(Clock::time_point until) {
    std::unique_lock<std::mutex> lock(mutex_);
    return cv_.wait_until(lock, until, [&] { return finished_.load(std::memory_order_acquire); });
}

TransferTelemetry TransferJob::telemetry() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return telemetry_;
}

bool Transfer::cancel() const { return job_->abandon(Status::canceled("canceled by the caller")); }

PlanSummary Transfer::plan() const {
    PlanSummary s;
    for (const auto& p : job_->parts) s.add(*p.plan);
    return s;
}

}  // namespace kvxfer
