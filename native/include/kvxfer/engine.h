// The engine: the public C++ API, mirrored by the Python package.
//
// One Engine per process (or per GPU worker). It owns its backends, local registrations
// (Region), known peers (Peer) and received notifications.
//
// Thread contract: every method may be called from any thread. No engine-wide lock is
// held across I/O: addPeer connects without holding the control mutex, registerMemory
// registers with each backend without it, and post() takes no engine-wide lock at all (it
// validates against immutable Region / Peer snapshots and an atomic closed flag). Progress
// is made by each backend's own threads: nobody has to poll for bytes to move.
//
// Lifetime contract: a Region, a Peer and a Transfer each keep the Engine alive; a
// transfer keeps its Regions and Peer alive until its backend has let go of it.
// The engine holds its peers, so an engine is destroyed only after close() (the Python
// Engine calls it when garbage-collected); close() is described at its declaration.
// The engine's threads (its backends' and its deadline timer) form one ThreadGroup; the
// last reference to an engine may be dropped on one of them (a job released there): its
// destructor then runs on another thread (util/thread_group.h), never on its own.
#pragma once

#include <atomic>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kvxfer/backend.h"
#include "kvxfer/config.h"
#include "kvxfer/descriptor.h"
#include "kvxfer/memory.h"
#include "kvxfer/plan.h"
#include "kvxfer/status.h"
#include "kvxfer/transfer.h"

namespace kvxfer {

class Engine;
class Peer;
class DeadlineTimer;
class ThreadGroup;

// A registered range of local memory. Deregistered (every backend) when the last
// reference goes, which in-flight transfers hold.
class Region {
public:
    ~Region();
    uint32_t id() const { return id_; }
    uint8_t* base() const { return base_; }
    uint64_t length() const { return length_; }
    MemoryKind kind() const { return kind_; }
    int32_t device() const { return device_; }
    const std::optional<KvLayout>& layout() const { return layout_; }
    // True once deregisterMemory() or the engine's close() ended it: posts fail, peers
    // reach it no more.
    bool deregistered() const { return deregistered_.load(std::memory_order_acquire); }
    // Null where that backend does not handle this memory kind.
    BackendRegion* backendRegion(size_t backend_index) const { return backend_regions_[backend_index].get(); }

private:
    friend class Engine;
    Region() = default;
    std::shared_ptr<Engine> engine_;
    uint32_t id_ = 0;
    uint8_t* base_ = nullptr;
    uint64_t length_ = 0;
    MemoryKind kind_ = MemoryKind::kHost;
    int32_t device_ = -1;
    std::optional<KvLayout> layout_;
    std::atomic<bool> deregistered_{false};
    // Declared before the registrations so it is destroyed after them: the buffer must
    // outlive every backend's view of it (an MR, a receive in progress).
    std::shared_ptr<void> owner_;  // keeps the user's buffer alive (e.g. a Python object)
    std::vector<std::unique_ptr<BackendRegion>> backend_regions_;  // indexed like the engine's backends
};

// A known peer engine instance, reached through one backend.
class Peer {
public:
    ~Peer();
    const std::string& name() const { return name_; }
    uint64_t instanceId() const { return instance_id_; }
    const std::string& backendName() const { return backend_name_; }
    // The peer's latest descriptor (replaced as a whole when the peer is refreshed).
    std::shared_ptr<const PeerDescriptor> descriptor() const;
    bool removed() const;

private:
    friend class Engine;
    Peer() = default;
    std::shared_ptr<Engine> engine_;
    std::string name_;
    uint64_t instance_id_ = 0;
    size_t backend_index_ = 0;
    std::string backend_name_;
    mutable std::mutex mutex_;    // guards connection_, imports_, descriptor_, removed_, in_flight_
    std::mutex reconnect_mutex_;  // one reconnect at a time
    // Replaced as a whole by a reconnect; jobs hold the ones they use.
    std::shared_ptr<BackendPeer> connection_;
    std::map<uint32_t, std::shared_ptr<BackendRemoteRegion>> imports_;
    std::shared_ptr<const PeerDescriptor> descriptor_;
    bool removed_ = false;
    std::vector<std::weak_ptr<TransferJob>> in_flight_;
};

// One part of a transfer: bytes of one local region to or from one remote region.
struct TransferPart {
    std::shared_ptr<Region> local;
    TransferSide local_side;  // a BlockSide's layout is taken from the local region
    uint32_t remote_region = 0;
    TransferSide remote_side;  // a BlockSide's layout is taken from the peer's descriptor
};

// A transfer: any number of parts (zero = a notification-only transfer, e.g. a full
// prefix-cache hit), one deadline, one notification after every part's bytes.
struct TransferRequest {
    Op op = Op::kWrite;
    std::shared_ptr<Peer> peer;
    std::vector<TransferPart> parts;
    Bytes notify;
    std::chrono::milliseconds timeout{0};  // 0 = the engine's default_timeout
    bool coalesce = true;
};

struct Notification {
    std::string peer_name;
    uint64_t peer_instance = 0;
    Bytes payload;
};

struct EngineStats {
    uint64_t transfers_posted = 0;
    uint64_t transfers_done = 0;
    uint64_t transfers_failed = 0;
    uint64_t bytes_done = 0;
    uint64_t runs_posted = 0;
    uint64_t notifications_received = 0;
};

class Engine : public std::enable_shared_from_this<Engine>, private NotificationSink {
public:
    // Applies the KVXFER_* environment overlay (config.h) to `config` first.
    static Result<std::shared_ptr<Engine>> create(EngineConfig config);
    ~Engine() override;
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    const std::string& name() const { return config_.name; }
    const EngineConfig& config() const { return config_; }
    uint64_t instanceId() const { return instance_id_; }
    std::vector<std::string> backendNames() const;
    std::string describeBackends() const;
    std::vector<BackendCaps> backendCaps() const;

    // Registers memory with every backend that handles its kind. `layout`, when given, is
    // validated against the region and enables block-id transfers.
    Result<std::shared_ptr<Region>> registerMemory(const MemorySpan& span, std::optional<KvLayout> layout,
                                                   std::shared_ptr<void> owner = {});
    // Ends the region at once: it is no longer published, local posts naming it fail, and
    // every backend revokes peers' access (Backend::revokeMemory). Transfers already posted
    // from it keep its memory alive until their backend lets go.
    Status deregisterMemory(const Region& region);

    Bytes descriptor() const;
    // Adds or refreshes a peer. Each backend attempt gets its own connect_timeout, so a
    // fallback backend is not starved by the first. Same instance: regions are refreshed
    // in place. New instance under a known name (a restarted peer): the old entry is
    // replaced and its in-flight transfers are abandoned with kPeerUnreachable.
    Result<std::shared_ptr<Peer>> addPeer(ByteView descriptor);
    Status removePeer(const std::string& name);
    std::shared_ptr<Peer> findPeer(const std::string& name) const;

    // Validates and plans every part without moving anything.
    Result<PlanSummary> plan(const TransferRequest& request) const;
    Result<Transfer> post(const TransferRequest& request);
    Status notify(Peer& peer, ByteView payload, std::chrono::milliseconds timeout);

    std::vector<Notification> takeNotifications(size_t max = 0);
    // True if a notification is queued by `until`.
    bool waitNotification(Clock::time_point until);

    // Completion file descriptor (an eventfd) for event loops: readable once a watched
    // transfer ended or a notification arrived since the last drainCompletions().
    int completionFd() const { return completion_fd_; }
    // Reports the transfer's end through completionFd()/drainCompletions(); if it has
    // ended already, at once.
    void watch(const Transfer& transfer);
    // Ids of watched transfers that ended since the last call; clears the fd.
    std::vector<uint64_t> drainCompletions();

    EngineStats stats() const;
    // Close contract:
    // - Idempotent and safe from any thread, concurrently with any other call.
    // - New work is refused (kCanceled); in-flight transfers are abandoned (FAILED,
    //   kCanceled); peers are dropped; every region is revoked (peers reach none of it).
    // - When it returns on a thread that is not one of this engine's own: every backend
    //   thread of the engine and its deadline timer have been joined (none runs any more,
    //   none calls into user code any more: no region owner is released there later), and
    //   every transfer is DONE or FAILED and quiesced (its backend let go of it; a NIC's
    //   work on its memory was flushed first). A concurrent second call waits for that too.
    // - On one of the engine's own threads (e.g. a region's owner released when a backend
    //   thread drops a finished job) it does all of the above except joining threads, as a
    //   thread cannot join itself: the threads are told to stop, and the calling thread
    //   ends once it returns to its loop. The join is left to the next close() from another
    //   thread or to the destructor, which never runs on an engine thread (create()'s
    //   deleter hands it to a thread of no engine). Threads hold only shared state, so none
    //   touches freed memory meanwhile; nothing a NIC or GPU may still touch is freed
    //   before its work completed or was flushed.
    void close();
    bool closed() const { return closed_.load(std::memory_order_acquire); }

private:
    friend class Region;
    explicit Engine(EngineConfig config);
    Status deliver(std::string peer_name, uint64_t peer_instance, Bytes payload) override;
    void onRoom(std::function<void()> fn) override;
    struct PlannedPart {
        std::shared_ptr<const Plan> plan;
        const RegionDescriptor* remote = nullptr;
    };
    Status planParts(const TransferRequest& request, const PeerDescriptor& snapshot,
                     std::vector<PlannedPart>& out) const;
    Result<std::shared_ptr<TransferJob>> makeJob(const TransferRequest& request,
                                                 const std::vector<PlannedPart>& planned,
                                                 Clock::time_point posted);
    // Hands the job to its backend: the inline path for small jobs (the backend may move
    // them on this thread), else submit().
    Status start(Backend& backend, const std::shared_ptr<TransferJob>& job);
    // The one reconnect policy, for every backend: when a backend refuses a post because
    // its connection to the peer is dead (kPeerUnreachable from submit), the core
    // connects again to the same peer instance (its own connect_timeout), re-imports the
    // peer's regions, and posts once more. Jobs in flight keep the old connection alive.
    Status reconnect(Peer& peer, const BackendPeer* dead);
    void signalCompletion();
    void revoke(Region& region);
    Result<Transfer> postImpl(const TransferRequest& request);
    void onTerminal(TransferJob& job, bool done);

    EngineConfig config_;
    uint64_t instance_id_ = 0;
    Bytes secret_;  // PeerDescriptor::secret
    std::string host_id_;
    // Declared before the backends and the timer: they are destroyed before it.
    std::unique_ptr<ThreadGroup> threads_;
    std::vector<std::unique_ptr<Backend>> backends_;
    std::unique_ptr<DeadlineTimer> timer_;

    std::atomic<bool> closed_{false};
    std::mutex close_mutex_;
    std::condition_variable close_cv_;
    bool stopped_ = false;              // close() has told every thread to stop (guarded by close_mutex_)
    mutable std::mutex control_mutex_;  // guards the maps below; never held across I/O
    uint32_t next_region_id_ = 0;
    std::map<uint32_t, std::weak_ptr<Region>> regions_;
    std::map<uint32_t, RegionDescriptor> published_;
    std::map<std::string, std::shared_ptr<Peer>> peers_;

    mutable std::mutex notify_mutex_;
    std::condition_variable notify_cv_;
    std::deque<Notification> notifications_;
    uint64_t queued_bytes_ = 0;                        // payload bytes in notifications_
    std::vector<std::function<void()>> room_waiters_;  // onRoom(), called when taking frees room

    int completion_fd_ = -1;
    std::mutex completion_mutex_;
    std::vector<uint64_t> completed_;

    std::atomic<uint64_t> next_transfer_id_{1};
    mutable std::mutex stats_mutex_;
    EngineStats stats_;
};

}  // namespace kvxfer
