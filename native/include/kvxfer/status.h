// Status and Result<T>: the only error channel inside the C++ core.
//
// Every fallible call returns Status or Result<T>. "In progress" and back-pressure are
// never errors. The function that first detects an error writes the message (with errno
// text or the work-completion status); callers propagate without rewording.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace kvxfer {

enum class StatusCode : uint8_t {
    kOk = 0,
    kInvalidArgument,  // caller's fault: bad sizes, bad layout, mismatched lengths
    kOutOfRange,       // a block id or extent outside its region or layout
    kNotFound,         // unknown region, peer or backend
    kUnsupported,      // the backend or build lacks the capability
    kSystem,           // an OS or verbs call failed; the message carries errno / wc status
    kPeerUnreachable,  // the peer is gone (process exited, connection lost)
    kRemote,           // the peer rejected the operation
    kTimeout,          // a deadline passed
    kCanceled,         // cancel() was called
    kBadDescriptor,    // malformed, truncated or incompatible peer metadata
    kInternal,         // a kvxfer bug or a broken internal contract
    kBackPressure,     // a bounded queue is full (the receiver is not keeping up); nothing was lost
};

const char* statusCodeName(StatusCode code);

class [[nodiscard]] Status {
public:
    Status() = default;
    Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

    static Status ok() { return {}; }
    static Status invalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
    static Status outOfRange(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
    static Status notFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
    static Status unsupported(std::string m) { return {StatusCode::kUnsupported, std::move(m)}; }
    static Status system(std::string m) { return {StatusCode::kSystem, std::move(m)}; }
    static Status systemErrno(const std::string& what, int err);
    static Status peerUnreachable(std::string m) { return {StatusCode::kPeerUnreachable, std::move(m)}; }
    static Status remote(std::string m) { return {StatusCode::kRemote, std::move(m)}; }
    static Status timeout(std::string m) { return {StatusCode::kTimeout, std::move(m)}; }
    static Status canceled(std::string m) { return {StatusCode::kCanceled, std::move(m)}; }
    static Status badDescriptor(std::string m) { return {StatusCode::kBadDescriptor, std::move(m)}; }
    static Status internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
    static Status backPressure(std::string m) { return {StatusCode::kBackPressure, std::move(m)}; }

    bool isOk() const { return code_ == StatusCode::kOk; }
    explicit operator bool() const { return isOk(); }
    StatusCode code() const { return code_; }
    const std::string& message() const { return message_; }
    std::string toString() const;

private:
    StatusCode code_ = StatusCode::kOk;
    std::string message_;
};

template <typename T>
class [[nodiscard]] Result {
public:
    Result(T value) : value_(std::move(value)) {}          // NOLINT: implicit by design
    Result(Status status) : status_(std::move(status)) {}  // NOLINT: implicit by design

    bool isOk() const { return status_.isOk(); }
    explicit operator bool() const { return isOk(); }
    const Status& status() const { return status_; }
    T& value() & { return *value_; }
    const T& value() const& { return *value_; }
    T&& value() && { return std::move(*value_); }
    T* operator->() { return &*value_; }
    const T* operator->() const { return &*value_; }
    T& operator*() { return *value_; }

private:
    std::optional<T> value_;
    Status status_;
};

}  // namespace kvxfer

#define KVXFER_CONCAT_INNER(a, b) a##b
#define KVXFER_CONCAT(a, b) KVXFER_CONCAT_INNER(a, b)

// Propagate a non-OK Status from an expression returning Status.
#define KVXFER_RETURN_IF_ERROR(expr)                       \
    do {                                                   \
        ::kvxfer::Status kvxfer_status_ = (expr);          \
        if (!kvxfer_status_.isOk()) return kvxfer_status_; \
    } while (0)

// `KVXFER_ASSIGN_OR_RETURN(auto x, makeX());` unwraps a Result<T> or returns its Status.
#define KVXFER_ASSIGN_OR_RETURN(lhs, expr)                       \
    auto KVXFER_CONCAT(kvxfer_result_, __LINE__) = (expr);       \
    if (!KVXFER_CONCAT(kvxfer_result_, __LINE__).isOk())         \
        return KVXFER_CONCAT(kvxfer_result_, __LINE__).status(); \
    lhs = std::move(KVXFER_CONCAT(kvxfer_result_, __LINE__)).value()
