// The backend SPI: what a transport implements. Backends include this header, status.h,
// plan.h, descriptor.h and native/src/util only; coalescing, validation, planning,
// deadlines and metadata all live in the core.
//
// Thread contract
// - Control plane (registerMemory, connect, importRemoteRegion, endpointInfo) is called
//   by the engine under its control mutex: never concurrently on one backend. It may
//   block briefly (a connect handshake) but must honour the timeout it is given.
// - submit() may be called from any thread, concurrently. It must not block on the
//   network or on the copy itself; it hands the job to the backend's own threads.
// - Progress: each backend owns its threads (copy workers, CQ poller, socket reader).
//   There is no shared progress thread and no caller-driven progress.
// - A backend calls job->finish() exactly once per submitted job, from any thread.
//
// Lifetime contract
// - A TransferJob keeps the local Region, the peer connection and the imported remote
//   region alive (shared_ptr) until the backend drops its last reference, so nothing a
//   NIC or a copy thread may still touch is freed, even if the user dropped everything.
// - Backend objects (BackendRegion, BackendPeer, BackendRemoteRegion) are destroyed by
//   the core only after every job that references them has been released.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "kvxfer/descriptor.h"
#include "kvxfer/plan.h"
#include "kvxfer/status.h"

namespace kvxfer {

using Clock = std::chrono::steady_clock;

enum class Op : uint8_t { kWrite = 0, kRead = 1 };
const char* opName(Op op);

// Public transfer state. Internally a job passes through "committing" (data done,
// notification being sent), which is reported as kPending.
enum class TransferState : uint8_t { kPending = 0, kDone = 1, kFailed = 2 };

struct BackendCaps {
    bool same_process_only = false;  // loopback
    bool same_host_only = false;     // shm
    uint64_t max_run_bytes = 0;      // the planner splits longer runs; 0 = unbounded
};

// A backend's view of one local registration (e.g. an ibv_mr). Destroyed after the
// last job using it.
class BackendRegion {
public:
    virtual ~BackendRegion() = default;
    // Bytes the peer needs to access this region through this backend (an rkey...).
    virtual Bytes remoteKey() const { return {}; }
};

// A backend's connection to one peer engine instance.
class BackendPeer {
public:
    virtual ~BackendPeer() = default;
};

// A backend's import of one of the peer's regions (address + key).
class BackendRemoteRegion {
public:
    virtual ~BackendRemoteRegion() = default;
};

struct LocalRegionView {
    uint32_t id = 0;
    uint8_t* base = nullptr;
    uint64_t length = 0;
    BackendRegion* backend = nullptr;  // this backend's registration of the region
};

struct RemoteRegionView {
    uint32_t id = 0;
    uint64_t base_address = 0;
    uint64_t length = 0;
    BackendRemoteRegion* backend = nullptr;
};

// Identity of the engine at the other end of a connection, taken from its descriptor.
struct PeerIdentity {
    std::string name;
    uint64_t instance_id = 0;
    uint32_t pid = 0;
    bool same_host = false;
};

// One posted transfer as a backend sees it. Created by the core; the backend reads the
// plan and views, moves the bytes, delivers `notify` (if any) to the peer only after
// every byte is visible there, then calls finish(). Shared between the core's Transfer
// handle and the backend's queues.
class TransferJob {
public:
    // Set by the core before submit(); immutable afterwards.
    uint64_t id = 0;
    Op op = Op::kWrite;
    std::shared_ptr<const Plan> plan;
    LocalRegionView local;
    RemoteRegionView remote;
    BackendPeer* peer = nullptr;
    Bytes notify;
    Clock::time_point deadline = Clock::time_point::max();
    std::shared_ptr<void> keepalive;  // local Region + peer connection + remote import

    // True once the transfer was canceled or its deadline passed (or the engine closes):
    // backends check it between chunks and stop early. Cheap.
    bool abandoned() const;
    // Call after the data is complete and before sending the notification. Returns false
    // if the transfer was abandoned meanwhile: then send nothing and finish() with any
    // status (it is ignored). After true, the transfer can no longer time out or cancel.
    bool beginCommit();
    // Terminal report from the backend: exactly once per job.
    void finish(Status status);

    // --- core side ---
    TransferState state();  // applies the deadline lazily
    Status status() const;
    // Blocks until terminal or `until`; returns the state. Applies the deadline.
    TransferState waitUntil(Clock::time_point until);
    // Requests termination with `why`; terminal at once unless already committing.
    bool abandon(Status why);
    // True once the backend has called finish(): its threads no longer touch the memory.
    bool quiesced() const { return finished_.load(std::memory_order_acquire); }
    std::function<void(TransferJob&)> on_abandon;  // backend cancel hook, may be empty
    // Core statistics hook: called once, with the job's lock held and before waiters
    // wake, with whether it ended DONE. Must not call back into the job.
    std::function<void(bool done)> on_terminal;

private:
    enum Internal : uint8_t { kRunning, kCommitting, kOk, kFail };
    bool toTerminal(Internal to, Status status, bool from_backend);
    void expireIfDue();

    std::atomic<uint8_t> state_{kRunning};
    std::atomic<bool> finished_{false};
    mutable std::mutex mutex_;
    std::condition_variable cv_;
    Status status_;
};

// Delivery of notifications that a backend receives from peers.
class NotificationSink {
public:
    virtual ~NotificationSink() = default;
    virtual void deliver(std::string peer_name, uint64_t peer_instance, Bytes payload) = 0;
};

struct BackendContext {
    std::string engine_name;
    uint64_t instance_id = 0;
    NotificationSink* sink = nullptr;  // outlives the backend
    unsigned threads = 0;              // copy/progress threads; 0 = backend default
    std::string device;                // backend-specific device selector ("" = auto)
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual std::string_view name() const = 0;
    virtual const BackendCaps& caps() const = 0;

    // Opaque bytes published in this engine's descriptor for this backend.
    virtual Bytes endpointInfo() const = 0;
    virtual Result<std::unique_ptr<BackendRegion>> registerMemory(uint8_t* base, uint64_t length) = 0;
    // kUnsupported when this backend cannot reach the peer (the engine tries the next one).
    virtual Result<std::shared_ptr<BackendPeer>> connect(const PeerIdentity& peer, ByteView endpoint_info,
                                                         Clock::time_point deadline) = 0;
    virtual Result<std::unique_ptr<BackendRemoteRegion>> importRemoteRegion(BackendPeer& peer,
                                                                            const RegionDescriptor& region,
                                                                            ByteView remote_key) = 0;

    // Starts the job asynchronously. An error return means nothing was started and the
    // core fails the transfer with it; otherwise the backend calls job->finish() later.
    virtual Status submit(const std::shared_ptr<TransferJob>& job) = 0;
    // A standalone notification, ordered after every job to this peer that has finished.
    virtual Status notify(BackendPeer& peer, ByteView payload, Clock::time_point deadline) = 0;
    // Short human-readable description (device, GID, MTU, threads) for banners.
    virtual std::string describe() const { return std::string(name()); }
};

// --- registry (native/src/backends/registry.cc: the only file that knows every backend) ---
struct BackendInfo {
    std::string name;
    bool available = false;
    std::string reason;          // why unavailable ("" when available)
    bool on_by_default = false;  // started by an Engine whose config names no backends
};
std::vector<BackendInfo> listBackends();
Result<std::unique_ptr<Backend>> createBackend(const std::string& name, const BackendContext& context);

}  // namespace kvxfer
