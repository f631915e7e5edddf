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

const char* opName(Op op) { return op == Op::kWrite ? "WRITE" : "READ"; }

bool TransferJob::toTerminal(Internal to, Status status, bool from_backend) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        const uint8_t cur = state_.load(std::memory_order_acquire);
        if (cur == kOk || cur == kFail) return false;
        // A committing job (notification on its way) can only be ended by its backend.
        if (cur == kCommitting && !from_backend) return false;
        status_ = std::move(status);
        if (on_terminal) on_terminal(to == kOk);
        state_.store(to, std::memory_order_release);
    }
    cv_.notify_all();
    return true;
}

void TransferJob::expireIfDue() {
    if (state_.load(std::memory_order_acquire) == kRunning && Clock::now() >= deadline) {
        abandon(Status::timeout("transfer " + std::to_string(id) + " missed its deadline"));
    }
}

bool TransferJob::abandoned() const {
    const uint8_t s = state_.load(std::memory_order_acquire);
    return s == kFail || (s == kRunning && Clock::now() >= deadline);
}

bool TransferJob::beginCommit() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (state_.load(std::memory_order_acquire) != kRunning || Clock::now() >= deadline) return false;
    state_.store(kCommitting, std::memory_order_release);
    return true;
}

void TransferJob::finish(Status status) {
    // The outcome must not depend on whether anyone observed the job before its
    // deadline: a job still running past it ends TIMEOUT, as a poll would have said.
    expireIfDue();
    finished_.store(true, std::memory_order_release);
    if (status.isOk()) {
        toTerminal(kOk, Status::ok(), true);
    } else {
        toTerminal(kFail, std::move(status), true);
    }
    cv_.notify_all();  // quiesced() waiters
}

bool TransferJob::abandon(Status why) {
    if (!toTerminal(kFail, std::move(why), false)) return false;
    if (on_abandon) on_abandon(*this);
    return true;
}

TransferState TransferJob::state() {
    expireIfDue();
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
    {
        std::unique_lock<std::mutex> lock(mutex_);
        const auto limit = std::min(until, deadline);
        cv_.wait_until(lock, limit, [&] {
            const uint8_t s = state_.load(std::memory_order_acquire);
            return s == kOk || s == kFail;
        });
    }
    return state();
}

}  // namespace kvxfer
