// ibverbs backend: the types the backend's files share. Private to this directory.
//
// `Shared` is everything the progress thread touches; its member functions are spread over
// the files by concern (README.md has the map): tunables.cc (Tunables, the debug switch),
// shared.cc (verbs resources), progress.cc (the loop, commands, async events), jobs.cc (a
// Work's life), posting.cc (work requests into send windows), completions.cc (the CQ),
// connection.cc (a peer's queue pairs) and connection_manager.cc (the UD handshake).
// ibverbs_backend.cc is the Backend subclass.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backends/ibverbs/completion_queue.h"
#include "backends/ibverbs/device.h"
#include "backends/ibverbs/memory.h"
#include "backends/ibverbs/queue_pair.h"
#include "backends/ibverbs/verbs_loader.h"
#include "backends/ibverbs/wire.h"
#include "backends/ibverbs/work_request.h"
#include "kvxfer/backend.h"
#include "kvxfer/config.h"

namespace kvxfer::ib {

using namespace std::chrono_literals;

constexpr uint32_t kDefaultQkey = 0x4b565846;  // "KVXF"; high bit clear (not a controlled qkey)
constexpr size_t kGrhBytes = 40;               // UD receive buffers start with the GRH
constexpr uint32_t kUdRecvDepth = 64;
constexpr uint32_t kUdSendSlots = 32;
constexpr uint64_t kNotifyUnit = ~uint64_t{0};  // unit id of a notification SEND
constexpr size_t kMaxChallenges = 4096;
constexpr std::chrono::seconds kChallengeLife{10};
// Labels of the connection manager's MACs (one per role, never valid elsewhere).
constexpr std::string_view kInitiatorLabel{"kvxfer-ibverbs-initiator\0", 25};
constexpr std::string_view kTargetLabel{"kvxfer-ibverbs-target\0", 22};
constexpr std::string_view kDisconnectLabel{"kvxfer-ibverbs-disconnect\0", 26};

// ---- tunables (from IbverbsConfig) ----------------------------------------------------

struct Tunables {
    uint32_t qps_per_peer = 2;
    uint32_t sq_depth = 256;
    uint32_t signal_interval = 32;
    uint32_t chain_max = 32;  // WRs per post list (and per QP turn when spreading a job)
    uint32_t recv_buffers = 64;
    uint32_t notify_slots = 32;  // per slab, shared by all peers; one peer holds at most a quarter of
                                 // one slab; more slabs are registered on demand (kMaxNotifySlabs)
    uint32_t cq_entries = 16384;
    uint64_t max_wr_bytes = 1 << 20;
    RcTiming timing;
    uint8_t min_rnr_timer = 12;
    uint8_t traffic_class = 0;
    uint8_t service_level = 0;
    uint32_t spin_us = 20;
    std::chrono::milliseconds repair_timeout{4000};

    // From the configuration, clamped to what the backend supports (tunables.cc).
    static Tunables from(const IbverbsConfig& c);
};

// ---- small helpers ---------------------------------------------------------------------

// A one-shot result a caller thread waits for (connect, standalone notify).
struct Waiter {
    std::mutex mutex;
    std::condition_variable cv;
    bool done = false;
    Status status;

    void set(Status st) {
        {
            std::lock_guard<std::mutex> lock(mutex);
            if (done) return;
            done = true;
            status = std::move(st);
        }
        cv.notify_all();
    }
    // True when set by `until`.
    bool wait(Clock::time_point until) {
        std::unique_lock<std::mutex> lock(mutex);
        return cv.wait_until(lock, until, [&] { return done; });
    }
};

// IbverbsConfig::debug (KVXFER_IBVERBS_DEBUG=1): one line on stderr per connection event
// (connect, QP failure, repair, re-posted runs, death). Off by default; never on the
// per-WR path. Process-wide: any engine that turns it on turns it on for all.
extern std::atomic<bool> g_debug;  // tunables.cc
bool debugEnabled();

template <typename... Args>
void debugLog(const char* fmt, Args... args) {
    if (!debugEnabled()) return;
    std::fprintf(stderr, "kvxfer ibverbs [%d]: ", static_cast<int>(::getpid()));
    std::fprintf(stderr, fmt, args...);
    std::fputc('\n', stderr);
}

// `v` in lowercase hexadecimal, no prefix (shared.cc).
std::string hex(uint64_t v);

// ---- connection state (owned by the progress thread) -----------------------------------

struct Connection;
struct Work;

enum class SlotState : uint8_t {
    kIdle,       // QP created, waiting for the peer's reply to be connected
    kReady,      // connected: may post
    kFailed,     // a completion error or flush was seen: draining outstanding WRs
    kBroken,     // drained: waiting to be replaced
    kRepairing,  // replacement QP created, waiting for the peer's reply
    kDead,       // gave up
};

struct Slot {
    int index = 0;
    SlotState state = SlotState::kIdle;
    std::unique_ptr<QueuePair> qp;
    SendWindow window{1, 1};
    uint32_t remote_qpn = 0;
    uint32_t remote_psn = 0;
    Status error;               // why it failed
    bool remote_fault = false;  // the failure was one WR's remote fault: innocent WRs are redone
};

enum class ConnState : uint8_t { kConnecting, kReady, kDead };

struct Connection {
    uint64_t id = 0;
    bool initiator = true;
    std::string peer_name;
    uint64_t peer_instance = 0;
    EndpointInfo remote;  // the peer's connection manager (UD) address
    ibv_mtu mtu = IBV_MTU_1024;
    uint8_t remote_rd_atomic = 1;
    std::vector<Slot> slots;
    uint32_t generation = 0;
    // Authentication (README.md, "Authentication"): the initiator holds the peer's secret;
    // both sides keep the nonces of the handshake that connected the current generation.
    Bytes peer_secret;
    auth::Nonce initiator_nonce{};
    auth::Nonce target_nonce{};
    bool have_target_nonce = false;  // initiator: the target's CHALLENGE arrived

    // Read by submit() on other threads.
    std::atomic<bool> dead{false};
    std::mutex dead_mutex;
    Status dead_status;

    // --- progress thread only ---
    ConnState state = ConnState::kConnecting;
    std::shared_ptr<Waiter> connect_waiter;  // the connect() call waiting for the first reply
    bool handshaking = false;
    Clock::time_point handshake_deadline;
    Clock::time_point handshake_next;
    std::chrono::milliseconds handshake_interval{100};
    std::deque<Work*> queue;   // work with something left to post, FIFO
    size_t next_slot = 0;      // round robin
    bool released = false;     // its IbPeer is gone
    bool registered = false;   // in the progress thread's tables
    bool in_ready = false;     // in Shared::ready_queue_
    uint32_t notify_held = 0;  // notify slots its works hold (bounded: a stopped peer's SENDs
                               // wait in RNR and must not take every slot from healthy peers)

    void markDead(Status st) {
        {
            std::lock_guard<std::mutex> lock(dead_mutex);
            if (dead.load()) return;
            dead_status = std::move(st);
        }
        dead.store(true, std::memory_order_release);
    }
    Status deadStatus() {
        std::lock_guard<std::mutex> lock(dead_mutex);
        return dead_status;
    }
};

// One posted transfer or standalone notification, as the progress thread tracks it.
struct Work {
    std::shared_ptr<TransferJob> job;  // null for a standalone notification
    std::shared_ptr<Waiter> waiter;    // standalone notification: the notify() call
    std::shared_ptr<Connection> conn;
    Bytes payload;  // standalone notification payload (a job's is job->notify)
    ibv_wr_opcode opcode = IBV_WR_RDMA_WRITE;
    struct Keys {
        uint32_t lkey = 0;
        uint32_t rkey = 0;
        uint64_t remote_base = 0;  // the address the rkey was issued for
    };
    std::vector<Keys> keys;  // per job part
    uint64_t total = 0;      // units (plan runs)
    uint64_t next = 0;
    std::vector<std::pair<uint64_t, uint64_t>> redo;  // [first, end) units flushed by another's fault
    uint64_t outstanding = 0;
    Status error;
    bool stopped = false;  // abandoned or failed: post nothing more
    enum class Phase : uint8_t { kData, kNotifyQueued, kNotifyPosted, kFinished } phase = Phase::kData;
    int notify_slot = -1;
    bool queued = false;

    const Bytes& notifyPayload() const { return job ? job->notify : payload; }
    bool dataLeft() const { return next < total || !redo.empty(); }
};

struct Command {
    enum class Kind : uint8_t { kSubmit, kConnect, kAbortConnect, kNotify, kRelease, kCancel } kind;
    std::shared_ptr<TransferJob> job;
    std::shared_ptr<Connection> conn;
    std::shared_ptr<Waiter> waiter;
    Bytes payload;
    Clock::time_point deadline;
};

// ---- backend objects handed to the core --------------------------------------------------

// A registered region is two MRs over the same memory: a local one (its lkey serves local
// posts until the last local job lets go) and a remote one (its rkey is published). So
// `revoke()` (deregister() / close()) ends remote access at once by deregistering the
// remote MR, while local work in flight keeps a valid lkey.
class IbRegion final : public BackendRegion {
public:
    IbRegion(std::unique_ptr<MemoryRegion> local, std::unique_ptr<MemoryRegion> remote)
        : local_(std::move(local)),
          remote_(std::move(remote)),
          rkey_(remote_->rkey()),
          key_(encodeRemoteKey({remote_->rkey(), remote_->address()})) {}
    Bytes remoteKey() const override { return key_; }
    uint32_t lkey() const { return local_->lkey(); }
    uint32_t rkey() const { return rkey_; }
    // Deregisters the remote MR: when it returns, the rkey reaches nothing (idempotent).
    void revoke() {
        std::lock_guard<std::mutex> lock(mutex_);
        remote_.reset();
    }

private:
    std::unique_ptr<MemoryRegion> local_;
    std::mutex mutex_;
    std::unique_ptr<MemoryRegion> remote_;
    uint32_t rkey_;
    Bytes key_;
};

class IbRemoteRegion final : public BackendRemoteRegion {
public:
    explicit IbRemoteRegion(RemoteKey key) : key(key) {}
    RemoteKey key;
};

// ---- Shared: everything the progress thread touches ----------------------------------------

class Shared : public std::enable_shared_from_this<Shared> {
public:
    Shared(const VerbsApi& verbs, std::shared_ptr<Device> device, const BackendContext& ctx, Tunables t)
        : verbs_(verbs),
          device_(std::move(device)),
          t_(t),
          name_(ctx.engine_name),
          instance_(ctx.instance_id),
          secret_(ctx.secret),
          sink_(ctx.sink) {}

    ~Shared();  // shared.cc

    // Clamps the tunables to the device and creates the CQ, SRQ, slabs and UD QP (shared.cc).
    Status init();

    // ---- read-only facts (any thread) ----
    const Device& device() const { return *device_; }
    std::shared_ptr<Device> devicePtr() const { return device_; }
    const Tunables& tunables() const { return t_; }
    uint64_t maxMessage() const { return max_msg_; }
    uint32_t udQpn() const { return ud_qp_->qpn(); }
    uint32_t qkey() const { return qkey_; }
    uint8_t initiatorRdAtomic() const { return initiator_rd_atomic_; }
    bool deviceDead() const { return device_dead_.load(std::memory_order_acquire); }
    Status deviceDeadStatus() {
        std::lock_guard<std::mutex> lock(mutex_);
        return device_dead_status_;
    }
    bool portDown() const { return port_down_.load(std::memory_order_acquire); }

    // ---- commands from other threads ----
    // False once stopped: the command was not queued (the progress thread may be gone).
    bool enqueue(Command cmd) {
        bool must_wake = false;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (stopped_) return false;
            commands_.push_back(std::move(cmd));
            must_wake = sleeping_;
        }
        if (must_wake) wake();
        return true;
    }
    void stop() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stopped_ = true;
        }
        stop_.store(true, std::memory_order_release);
        wake();
    }

    // Builds an RC QP in INIT for a new connection (control thread).
    Result<std::unique_ptr<QueuePair>> newRcQp();  // connection.cc

    // ---- the progress thread ----
    void run();

private:
    void wake() {
        const uint64_t one = 1;
        (void)!::write(wake_fd_, &one, sizeof(one));
    }

    // Commands.
    void drainCommands();
    void admitJob(Command& cmd);
    void admitNotify(Command& cmd);
    void startConnect(Command& cmd);
    void abortConnect(const std::shared_ptr<Connection>& conn);
    void release(const std::shared_ptr<Connection>& conn);

    // Completions.
    int pollCompletions();
    void onCompletion(const ibv_wc& wc);
    void onRcSendCompletion(const ibv_wc& wc);
    void onSrqReceive(const ibv_wc& wc);
    // Hands held notifications to the sink in order, re-posting their buffers, until the
    // sink refuses with back-pressure (then it asks the sink to say when there is room).
    void deliverHeld();
    void onUdReceive(const ibv_wc& wc);
    void onAsyncEvents();

    // Connection manager.
    void onCm(const CmMessage& msg);
    void onConnectRequest(const CmMessage& msg);
    void onConnectReply(const CmMessage& msg);
    void onReject(const CmMessage& msg);
    void onDisconnect(const CmMessage& msg);
    void onChallenge(const CmMessage& msg);
    // Target: true when `req` proves this engine's secret over the nonces of a challenge it
    // issued (or of the connection it already accepted); else it answers a CHALLENGE (or a
    // REJECT for a wrong proof) and returns false.
    bool authenticate(const CmMessage& req);
    // Initiator: a fresh nonce for a new handshake (first connect or repair).
    void newHandshake(Connection& conn);
    // With a `label`, the message is signed with `secret` (CmMessage::mac).
    void sendCm(const CmMessage& msg, const ibv_gid& gid, uint16_t lid, uint32_t qpn, uint32_t qkey,
                ByteView secret = {}, std::string_view label = {});
    CmMessage requestFor(Connection& conn) const;
    void sendRequest(Connection& conn);
    void handshakeTimers(Clock::time_point now);
    void connectFailed(Connection& conn, Status st);
    void startRepair(Connection& conn);
    void registerConnection(const std::shared_ptr<Connection>& conn);
    void unregisterConnection(Connection& conn);
    void maybeRetire(const std::shared_ptr<Connection>& conn);
    Status connectSlot(Connection& conn, Slot& slot, const QpEndpoint& remote);

    // Data path.
    void postWork();
    bool postFrom(Connection& conn, Work& w);
    bool postNotify(Connection& conn, Work& w);
    Slot* pickSlot(Connection& conn, bool need_notify);
    void retireOk(Slot& slot, uint64_t upto);
    void retireFlushed(Slot& slot, uint64_t upto);
    void failSlot(Connection& conn, Slot& slot, Status st, bool remote_fault);
    void slotDrained(Connection& conn, Slot& slot);
    void connectionDead(Connection& conn, Status st);
    void advance(Work& w);
    void finishWork(Work& w, Status st);
    void enqueueWork(Work& w);
    void sweepAbandoned();
    void failEverything(Status st);

    // Receive buffers.
    Status postSrqBuffer(uint32_t i) {
        return srq_->post(makeWrId(WrKind::kSrqRecv, i), recv_slab_->slot(i),
                          static_cast<uint32_t>(recv_slab_->slotBytes()), recv_slab_->lkey());
    }
    Status postUdBuffer(uint32_t i) {
        return ud_qp_->postRecv(makeWrId(WrKind::kUdRecv, i), ud_slab_->slot(i),
                                static_cast<uint32_t>(ud_slab_->slotBytes()), ud_slab_->lkey());
    }

    void teardownConnections();

    // Error paths only: the completion may arrive before the PORT_ERR async event.
    bool portIsDown() {
        if (port_down_.load(std::memory_order_acquire)) return true;
        ibv_port_attr pa;
        if (verbs_.queryPort(device_->context(), device_->port(), &pa) == 0 && pa.state != IBV_PORT_ACTIVE) {
            port_down_.store(true);
            return true;
        }
        return false;
    }

    const VerbsApi& verbs_;
    std::shared_ptr<Device> device_;
    Tunables t_;
    std::string name_;
    uint64_t instance_ = 0;
    Bytes secret_;  // this engine's capability: every CONNECT_REQ proves it
    NotificationSink* sink_ = nullptr;
    uint32_t qkey_ = kDefaultQkey;
    uint64_t send_budget_ = 0;
    uint8_t responder_rd_atomic_ = 1;
    uint8_t initiator_rd_atomic_ = 1;
    uint64_t max_msg_ = 0;

    // Verbs objects, destroyed in reverse order (connections first: see the destructor).
    std::unique_ptr<CompletionQueue> cq_;
    std::unique_ptr<SharedReceiveQueue> srq_;
    std::unique_ptr<RegisteredSlab> recv_slab_;
    // Buffers of notifications too large to go inline; slot i lives in slab i / notify_slots.
    std::vector<std::unique_ptr<RegisteredSlab>> notify_slabs_;
    static constexpr size_t kMaxNotifySlabs = 16;
    Status growNotifySlots();
    uint8_t* notifyBuffer(int slot) const {
        return notify_slabs_[static_cast<size_t>(slot) / t_.notify_slots]->slot(static_cast<size_t>(slot) %
                                                                                t_.notify_slots);
    }
    uint32_t notifyLkey(int slot) const {
        return notify_slabs_[static_cast<size_t>(slot) / t_.notify_slots]->lkey();
    }
    std::unique_ptr<RegisteredSlab> ud_slab_;
    std::unique_ptr<QueuePair> ud_qp_;
    int wake_fd_ = -1;

    // Cross-thread.
    std::mutex mutex_;
    std::vector<Command> commands_;
    bool sleeping_ = false;
    bool stopped_ = false;
    std::atomic<bool> stop_{false};
    std::atomic<bool> device_dead_{false};
    Status device_dead_status_;
    std::atomic<bool> port_down_{false};
    std::atomic<bool> room_{false};  // the sink has room again (set by its onRoom callback)

    // Progress thread only.
    std::map<uint64_t, std::shared_ptr<Connection>> initiated_;                      // by connection id
    std::map<std::pair<uint64_t, uint64_t>, std::shared_ptr<Connection>> accepted_;  // (peer instance, id)
    std::unordered_map<uint32_t, std::pair<Connection*, Slot*>> by_qpn_;
    // Challenges issued and not yet answered, by (initiator instance, connection id);
    // bounded (kMaxChallenges, the oldest goes first) and short-lived (kChallengeLife).
    struct Challenge {
        auth::Nonce initiator_nonce{};
        auth::Nonce target_nonce{};
        Clock::time_point expires;
    };
    std::map<std::pair<uint64_t, uint64_t>, Challenge> challenges_;
    std::list<std::unique_ptr<Work>> works_;
    std::unordered_map<Work*, std::list<std::unique_ptr<Work>>::iterator> work_index_;
    std::vector<std::unique_ptr<Work>> graveyard_;      // finished: released at a safe point
    std::vector<std::shared_ptr<Connection>> closing_;  // released, draining before destruction
    std::deque<Connection*> ready_queue_;               // connections with queued work
    std::map<std::pair<std::string, uint16_t>, std::unique_ptr<AddressHandle>> ud_ahs_;
    std::vector<int> free_notify_;
    std::vector<int> free_ud_send_;
    uint64_t send_in_flight_ = 0;
    bool sweep_requested_ = false;
    // Received notifications the sink has not taken yet (its queue was full), in arrival
    // order; each keeps its SRQ buffer, so at most recv_buffers of them.
    struct HeldNote {
        uint32_t index = 0;  // SRQ buffer
        std::string peer_name;
        uint64_t peer_instance = 0;
        uint32_t length = 0;  // payload bytes, after the notification header
    };
    std::deque<HeldNote> held_;
    bool room_armed_ = false;  // an onRoom callback is registered with the sink
};

}  // namespace kvxfer::ib
