// The backend SPI: what a transport implements. Backends include this header, status.h,
// plan.h, descriptor.h, memory.h and native/src/util only; the transfer lifecycle
// (deadline, cancellation, commit, finish), coalescing, validation, planning and metadata
// all live in the core.
//
// Thread contract
// - Control plane (registerMemory, connect, importRemoteRegion) may be called from any
//   thread, concurrently for different regions or peers; a backend serialises what it
//   must itself. The core never holds an engine-wide lock across these calls. connect()
//   may block (a handshake) but must honour the deadline it is given.
// - endpointInfo() and caps() are called at any time, from any thread; they must be cheap
//   and return what was fixed at construction.
// - submit() may be called from any thread, concurrently. It must not block on the
//   network or on the copy itself; it hands the job to the backend's own threads.
// - cancel() is called by the core (any thread, possibly inside submit's caller) when a
//   job is abandoned (cancel, deadline, peer removed, engine closed). It must not block
//   and must not call back into the job synchronously except through the job's own
//   thread-safe methods. After it, the backend stops starting new operations of the job
//   and ends it (finish) as soon as nothing of it is in flight.
// - Progress: each backend owns its threads (copy workers, CQ poller, socket reader).
//   There is no shared progress thread and no caller-driven progress, except the inline
//   path: trySubmitInline() is called on the posting thread for jobs of at most
//   caps().inline_max_bytes and may do the job's work there (a small copy, one
//   non-blocking send), never waiting on the peer or on other jobs; and such a job's
//   TransferJob::Progress, which lets the thread that waits for (or polls) the job
//   complete it (tcp: read its own ACK).
//
// Lifecycle contract (the core's job machine, native/src/core/transfer.cc)
// - A backend reports a job's data outcome once, through TransferJob::dataDone(). The
//   core decides the rest: fail, finish DONE, or commit. Only when dataDone() answers
//   kSendNotification does the backend send job.notify to the peer (ordered after every
//   byte of the job), and then it calls finish() with the outcome of that send.
//   A backend that carries the notification with its last data operation (tcp's END
//   frame) asks TransferJob::commitNow() before sending it, and calls finish() later.
// - finish() is called exactly once per submitted job, from any thread; after it the
//   backend never touches the job's memory again (the job is "quiesced").
//
// Lifetime contract
// - A TransferJob keeps the local Regions, the peer connection and the imported remote
//   regions alive (shared_ptr) until the backend drops its last reference, so nothing a
//   NIC or a copy thread may still touch is freed, even if the user dropped everything.
// - Backend objects (BackendRegion, BackendPeer, BackendRemoteRegion) are destroyed by
//   the core only after every job that references them has been released.
//
// Threads and shutdown
// - Every thread a backend starts is started through BackendContext::threads (the
//   engine's ThreadGroup, util/thread_group.h); never std::thread directly, never detached.
//   The spawn fails once the engine is closing: the backend then fails what needed it.
// - shutdown() is called once, by Engine::close(), possibly on one of the backend's own
//   threads (a job released there). It must not block on the backend's threads: it tells
//   them to stop and wakes them; from then on submit() and notify() refuse (kCanceled),
//   and every job the backend still holds is ended (finish) by the thread holding it, on
//   its way out, after the device no longer touches its memory (a NIC's work flushed).
//   The core then joins the group: when that returns, every job was finished and
//   released. Threads capture only shared state, never the backend object.
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
#include <vector>

#include "kvxfer/descriptor.h"
#include "kvxfer/memory.h"
#include "kvxfer/plan.h"
#include "kvxfer/status.h"

namespace kvxfer {

using Clock = std::chrono::steady_clock;

enum class Op : uint8_t { kWrite = 0, kRead = 1 };
const char* opName(Op op);
constexpr uint32_t opBit(Op op) { return 1u << static_cast<uint32_t>(op); }

// Public transfer state. Internally a job passes through "committing" (data done,
// notification being sent), which is reported as kPending.
enum class TransferState : uint8_t { kPending = 0, kDone = 1, kFailed = 2 };

// What a backend can do; the core plans and routes by it. The conformance suite checks
// that what a backend advertises works.
struct BackendCaps {
    uint32_t ops = opBit(Op::kWrite) | opBit(Op::kRead);
    uint32_t memory_kinds = memoryKindBit(MemoryKind::kHost) | memoryKindBit(MemoryKind::kHostShareable);
    bool same_process_only = false;  // loopback
    bool same_host_only = false;     // shm, cuda_ipc
    bool notifications = true;       // notify and transfer notifications
    uint64_t max_run_bytes = 0;      // the planner splits longer runs; 0 = unbounded
    uint32_t lanes = 1;              // independent parallel paths to one peer (QPs, threads)
    // Jobs of at most this many bytes are first offered to Backend::trySubmitInline (the
    // caller's thread does the work); 0 = never. Measured per backend (docs/benchmarks.md).
    uint64_t inline_max_bytes = 0;

    bool supports(Op op) const { return (ops & opBit(op)) != 0; }
    bool supports(MemoryKind kind) const { return (memory_kinds & memoryKindBit(kind)) != 0; }
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
    MemoryKind kind = MemoryKind::kHost;
    int32_t device = -1;
    BackendRegion* backend = nullptr;  // this backend's registration of the region
};

struct RemoteRegionView {
    uint32_t id = 0;
    uint64_t base_address = 0;
    uint64_t length = 0;
    MemoryKind kind = MemoryKind::kHost;
    int32_t device = -1;
    BackendRemoteRegion* backend = nullptr;
};

// Identity of the engine at the other end of a connection, taken from its descriptor.
struct PeerIdentity {
    std::string name;
    uint64_t instance_id = 0;
    uint32_t pid = 0;
    bool same_host = false;
    Bytes secret;  // the peer's connection capability (PeerDescriptor::secret)
};

// One part of a transfer: a local region, a remote region, and the plan between them.
struct JobPart {
    std::shared_ptr<const Plan> plan;
    LocalRegionView local;
    RemoteRegionView remote;
    uint64_t first_run = 0;  // index of this part's first run in the job's run sequence
};

// One run of a job's flattened (parts x planes x runs) sequence, with bases applied.
struct FlatRun {
    uint32_t part = 0;
    uint8_t* local = nullptr;     // absolute local address
    uint64_t local_offset = 0;    // within the local region
    uint64_t remote_address = 0;  // absolute address in the peer's address space
    uint64_t remote_offset = 0;   // within the remote region
    uint64_t length = 0;
};

class Backend;

// Timestamps and sizes of one transfer, for telemetry.
struct TransferTelemetry {
    uint64_t bytes = 0;
    uint64_t runs = 0;
    uint64_t pieces = 0;  // blocks x layers x K/V (or extents) before coalescing
    uint32_t parts = 0;
    Clock::time_point posted{};
    Clock::time_point data_done{};  // zero until the backend reported the data
    Clock::time_point finished{};   // zero until terminal
    double post_cpu_us = 0;         // validation + planning + submit on the caller's thread
};

// One posted transfer as a backend sees it: the core's job machine. Created by the core;
// the backend reads the parts, moves the bytes, reports through dataDone()/finish().
class TransferJob {
public:
    // Set by the core before submit(); immutable afterwards.
    uint64_t id = 0;
    Op op = Op::kWrite;
    std::vector<JobPart> parts;
    uint64_t num_runs = 0;  // sum of the parts' runs
    uint64_t total_bytes = 0;
    BackendPeer* peer = nullptr;
    Backend* backend = nullptr;  // kept alive by keepalive (the peer holds the engine)
    Bytes notify;
    Clock::time_point deadline = Clock::time_point::max();
    std::shared_ptr<void> keepalive;  // local Regions + peer connection + remote imports

    // The i-th run of the flattened sequence (i < num_runs).
    FlatRun run(uint64_t i) const;
    // Index of the part holding run i.
    uint32_t partOf(uint64_t i) const;

    // --- backend side ---
    // True once the transfer was canceled or its deadline passed (or the engine closes):
    // backends check it between chunks and stop early. Cheap.
    bool abandoned() const;
    enum class AfterData : uint8_t { kFinished, kSendNotification };
    // The backend's one report that the job's data phase is over: `status` is the first
    // error (or OK); `all_moved` says every run completed. The core fails, finishes, or
    // (when there is a notification and the job is still wanted) moves the job to
    // committing and answers kSendNotification: the backend then sends job.notify and
    // calls finish() with the result. On kFinished the job has been finished already.
    AfterData dataDone(Status status, bool all_moved);
    // dataDone() for backends that finish jobs outside their own locks: it decides the
    // same way but does not finish; on kFinished `*finish_with` is the status to pass to
    // finish().
    AfterData decideAfterData(Status status, bool all_moved, Status* finish_with);
    // For backends that carry the notification with their last data operation: true when
    // the job may commit now (the notification may be sent); after true the job can no
    // longer time out or be canceled, and the backend must call finish() later. After
    // false, send nothing and finish() with any status (it is ignored).
    bool commitNow();
    // Terminal report from the backend: exactly once per job.
    void finish(Status status);
    // Optional hint: the backend expects the data to be done at `t` (cuda_ipc: the kernel's
    // bytes at the rate of the last ones). A waiter then sleeps until shortly before `t`
    // and spins through it, instead of paying a sleeping thread's wake-up (tens of
    // microseconds in a VM) after a long transfer. Correctness never depends on it.
    // Wakes a waiter already asleep, so that it re-plans its wait (once per job).
    void expectDataAt(Clock::time_point t);

    // Caller-driven completion (the inline path). A backend that takes a job in
    // trySubmitInline may point `progress` at an object that outlives the job's keepalive.
    // waitUntil() then calls progress->drive(job, until) first, before its spin and
    // sleeping, so the waiting thread can read the job's completion itself (tcp: its ACK)
    // instead of being woken by a backend thread. drive() returns once the job is terminal,
    // at `until` at the latest, or at once when it cannot help (another thread reads);
    // the job's deadline still applies; poll() calls drive(job, {}) (one non-blocking
    // look, so polling completes the job too). Engine::watch() calls release(job): nobody will
    // wait on this thread's behalf, so the backend's own threads must complete it.
    class Progress {
    public:
        virtual void drive(TransferJob& job, Clock::time_point until) = 0;
        virtual void release(TransferJob& job) = 0;

    protected:
        ~Progress() = default;
    };
    Progress* progress = nullptr;  // set before trySubmitInline returns; then immutable

    // --- core side ---
    TransferState state();  // applies the deadline lazily
    // DONE or FAILED already: one atomic load, no clock, no deadline check.
    bool terminal() const {
        const uint8_t s = state_.load(std::memory_order_acquire);
        return s == kOk || s == kFail;
    }
    // state() for the application (Transfer::state): first lets Progress take one look.
    // Not for backend or core threads (it may finish other jobs of the connection).
    TransferState poll();
    Status status() const;
    // Blocks until terminal or `until`; returns the state.
    TransferState waitUntil(Clock::time_point until);
    // Requests termination with `why`; terminal at once unless already committing. Pushes
    // the cancellation to the backend.
    bool abandon(Status why);
    // True once the backend has called finish(): its threads no longer touch the memory.
    bool quiesced() const { return finished_.load(std::memory_order_acquire); }
    // Blocks until quiesced or `until`.
    bool waitQuiesced(Clock::time_point until);
    TransferTelemetry telemetry() const;
    TransferTelemetry telemetry_;  // set by the core at post; times filled as the job moves
    // Core hook: called once, with the job's lock held and before waiters wake, with
    // whether it ended DONE. Must not call back into the job.
    std::function<void(TransferJob&, bool done)> on_terminal;
    std::atomic<bool> watched{false};  // the engine reports its end on the completion fd

private:
    enum Internal : uint8_t { kRunning, kCommitting, kOk, kFail };
    // `now`: the caller's clock reading, or zero to read the clock.
    bool toTerminal(Internal to, Status status, bool from_backend, Clock::time_point now = {});
    void expireIfDue(Clock::time_point now);
    bool commitAt(Clock::time_point now);

    std::atomic<uint8_t> state_{kRunning};
    std::atomic<bool> finished_{false};
    std::atomic<Clock::rep> expected_ns_{0};  // expectDataAt(); 0 = no estimate
    mutable std::mutex mutex_;
    std::condition_variable cv_;
    Status status_;
};

// Delivery of notifications that a backend receives from peers. The queue behind it is
// bounded: kBackPressure means nothing was queued, and the backend must make the sender
// see it (an error reply that fails the sender's transfer, or not reading the sender's
// socket until there is room): a notification is never dropped silently.
class NotificationSink {
public:
    virtual ~NotificationSink() = default;
    virtual Status deliver(std::string peer_name, uint64_t peer_instance, Bytes payload) = 0;
    // Called by the sink when room appears after a kBackPressure (any thread, cheap).
    virtual void onRoom(std::function<void()> fn) {}
};

struct BackendConfigs;  // config.h: one typed section per backend
class ThreadGroup;      // util/thread_group.h: the engine's threads

struct BackendContext {
    std::string engine_name;
    uint64_t instance_id = 0;
    Bytes secret;                            // this engine's capability: connections must prove it
    NotificationSink* sink = nullptr;        // outlives the backend
    const BackendConfigs* config = nullptr;  // outlives the backend; the backend reads its section
    ThreadGroup* threads = nullptr;          // outlives the backend; every backend thread starts here
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual std::string_view name() const = 0;
    virtual const BackendCaps& caps() const = 0;

    // Opaque bytes published in this engine's descriptor for this backend.
    virtual Bytes endpointInfo() const = 0;
    // Called only for memory kinds caps().memory_kinds lists.
    virtual Result<std::unique_ptr<BackendRegion>> registerMemory(const MemorySpan& span) = 0;
    // The region was deregistered (or the engine closed): end every peer's access to it
    // through this backend now. When it returns, nothing a peer sends lands in the region
    // any more (an access in progress has finished or failed). May block briefly; never
    // on a peer. The BackendRegion itself is destroyed later, after the last local job.
    virtual void revokeMemory(BackendRegion& region) {}
    // kUnsupported when this backend cannot reach the peer (the engine tries the next one).
    virtual Result<std::shared_ptr<BackendPeer>> connect(const PeerIdentity& peer, ByteView endpoint_info,
                                                         Clock::time_point deadline) = 0;
    virtual Result<std::unique_ptr<BackendRemoteRegion>> importRemoteRegion(BackendPeer& peer,
                                                                            const RegionDescriptor& region,
                                                                            ByteView remote_key) = 0;

    // Starts the job asynchronously. An error return means nothing was started and the
    // core fails the transfer with it; otherwise the backend calls job->finish() later.
    virtual Status submit(const std::shared_ptr<TransferJob>& job) = 0;
    // The inline path for small jobs (caps().inline_max_bytes): the backend may move the
    // job on the calling thread. Returns false when it declines, with nothing started (the
    // core then calls submit()); true when it took the job, which it then reports through
    // the job machine exactly as after submit() (dataDone / notification / finish; the
    // job is usually finished before this returns). An error return means nothing was
    // started, as for submit(). It must not block: it declines instead of queueing behind
    // other work, and it takes no lock that is held across a bulk transfer's I/O or copy.
    virtual Result<bool> trySubmitInline(const std::shared_ptr<TransferJob>& job) { return false; }
    // The core abandoned `job` (see the thread contract). Default: the backend notices
    // through abandoned() between operations.
    virtual void cancel(TransferJob& job) {}
    // A standalone notification, ordered after every job to this peer that has finished.
    virtual Status notify(BackendPeer& peer, ByteView payload, Clock::time_point deadline) = 0;
    // Short human-readable description (device, GID, MTU, threads) for banners.
    virtual std::string describe() const { return std::string(name()); }
    // The engine is closing (see "Threads and shutdown" above): stop every thread, refuse
    // new work, end held jobs on the way out. Never blocks on the backend's own threads.
    virtual void shutdown() {}
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
