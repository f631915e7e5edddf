// ibverbs backend: one-sided RDMA WRITE / READ over RC queue pairs, connections set up
// by a tiny connection manager over a UD queue pair (no socket side channel), and
// notifications as RC SENDs received into a shared receive queue. README.md in this
// directory has the design, the wire formats and the tunables.
//
// Threads: the control plane (registerMemory, connect, importRemoteRegion) runs on the
// caller's thread; submit() and notify() only queue a command and wake the progress
// thread. The progress thread owns every connection, queue pair window and job state:
// it posts work requests, polls the one completion queue, answers connection requests,
// delivers notifications and applies deadlines. It captures only `Shared` (never the
// backend object), because the backend may be destroyed on that very thread when it
// drops the last reference to a finished job (then the thread is detached, not joined).
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <random>
#include <thread>
#include <unordered_map>

#include "backends/factories.h"
#include "backends/ibverbs/completion_queue.h"
#include "backends/ibverbs/device.h"
#include "backends/ibverbs/memory.h"
#include "backends/ibverbs/queue_pair.h"
#include "backends/ibverbs/verbs_loader.h"
#include "backends/ibverbs/wire.h"
#include "backends/ibverbs/work_request.h"
#include "kvxfer/config.h"

namespace kvxfer {
namespace ib {
namespace {

using namespace std::chrono_literals;

constexpr uint32_t kDefaultQkey = 0x4b565846;  // "KVXF"; high bit clear (not a controlled qkey)
constexpr size_t kGrhBytes = 40;               // UD receive buffers start with the GRH
constexpr uint32_t kUdRecvDepth = 64;
constexpr uint32_t kUdSendSlots = 32;
constexpr uint64_t kNotifyUnit = ~uint64_t{0};  // unit id of a notification SEND

// ---- tunables (from IbverbsConfig) ----------------------------------------------------

struct Tunables {
    uint32_t qps_per_peer = 2;
    uint32_t sq_depth = 256;
    uint32_t signal_interval = 32;
    uint32_t chain_max = 32;  // WRs per post list (and per QP turn when spreading a job)
    uint32_t recv_buffers = 64;
    uint32_t notify_slots = 8;
    uint32_t cq_entries = 16384;
    uint64_t max_wr_bytes = 1 << 20;
    RcTiming timing;
    uint8_t min_rnr_timer = 12;
    uint8_t traffic_class = 0;
    uint8_t service_level = 0;
    uint32_t spin_us = 20;
    std::chrono::milliseconds repair_timeout{4000};

    static Tunables from(const IbverbsConfig& c) {
        Tunables t;
        t.qps_per_peer = std::clamp<uint32_t>(c.qps_per_peer, 1, CmMessage::kMaxQps);
        t.sq_depth = std::clamp<uint32_t>(c.sq_depth, 16, 8192);
        t.signal_interval = std::max<uint32_t>(1, std::min<uint32_t>(t.sq_depth / 4, 32));
        t.chain_max = static_cast<uint32_t>(std::min<uint64_t>(PostList::kMaxWrs, t.signal_interval));
        t.recv_buffers = std::clamp<uint32_t>(c.recv_buffers, 4, 4096);
        t.max_wr_bytes = std::clamp<uint64_t>(c.max_wr_bytes, 4096, uint64_t{1} << 30);
        t.timing.timeout = static_cast<uint8_t>(std::clamp<uint32_t>(c.ack_timeout, 1, 31));
        t.timing.retry_cnt = static_cast<uint8_t>(std::min<uint32_t>(c.retry_cnt, 7));
        t.timing.rnr_retry = static_cast<uint8_t>(std::min<uint32_t>(c.rnr_retry, 7));
        t.traffic_class = static_cast<uint8_t>(std::min<uint32_t>(c.traffic_class, 255));
        t.service_level = static_cast<uint8_t>(std::min<uint32_t>(c.service_level, 15));
        t.spin_us = std::min<uint32_t>(c.spin_us, 100000);
        return t;
    }
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

uint64_t randomU64() {
    static thread_local std::mt19937_64 rng{(static_cast<uint64_t>(std::random_device{}()) << 32) ^
                                            std::random_device{}()};
    uint64_t v = 0;
    while (v == 0) v = rng();
    return v;
}

// IbverbsConfig::debug (KVXFER_IBVERBS_DEBUG=1): one line on stderr per connection event
// (connect, QP failure, repair, re-posted runs, death). Off by default; never on the
// per-WR path. Process-wide: any engine that turns it on turns it on for all.
std::atomic<bool> g_debug{false};
bool debugEnabled() { return g_debug.load(std::memory_order_relaxed); }

template <typename... Args>
void debugLog(const char* fmt, Args... args) {
    if (!debugEnabled()) return;
    std::fprintf(stderr, "kvxfer ibverbs [%d]: ", static_cast<int>(::getpid()));
    std::fprintf(stderr, fmt, args...);
    std::fputc('\n', stderr);
}

std::string hex(uint64_t v) {
    char buf[24];
    std::snprintf(buf, sizeof(buf), "%llx", static_cast<unsigned long long>(v));
    return buf;
}

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
    std::deque<Work*> queue;  // work with something left to post, FIFO
    size_t next_slot = 0;     // round robin
    bool released = false;    // its IbPeer is gone
    bool registered = false;  // in the progress thread's tables
    bool in_ready = false;    // in Shared::ready_queue_

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

class IbRegion final : public BackendRegion {
public:
    explicit IbRegion(std::unique_ptr<MemoryRegion> mr) : mr_(std::move(mr)) {}
    Bytes remoteKey() const override { return encodeRemoteKey({mr_->rkey(), mr_->address()}); }
    uint32_t lkey() const { return mr_->lkey(); }

private:
    std::unique_ptr<MemoryRegion> mr_;
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
          sink_(ctx.sink) {}

    ~Shared() {
        // The progress thread has exited: nothing else touches these objects.
        teardownConnections();
        ud_ahs_.clear();
        ud_qp_.reset();
        srq_.reset();
        cq_.reset();
        if (wake_fd_ >= 0) ::close(wake_fd_);
    }

    Status init() {
        const ibv_device_attr& a = device_->attr();
        t_.sq_depth = std::min<uint32_t>(t_.sq_depth, static_cast<uint32_t>(std::max(16, a.max_qp_wr)));
        t_.recv_buffers =
            std::min<uint32_t>(t_.recv_buffers, static_cast<uint32_t>(std::max(4, a.max_srq_wr)));
        t_.cq_entries = std::min<uint32_t>(t_.cq_entries, static_cast<uint32_t>(std::max(256, a.max_cqe)));
        const uint32_t reserved = t_.recv_buffers + kUdRecvDepth + kUdSendSlots + 64;
        if (t_.cq_entries <= reserved + t_.sq_depth) {
            return Status::unsupported("ibverbs: device " + device_->name() + " allows only " +
                                       std::to_string(a.max_cqe) + " CQ entries");
        }
        send_budget_ = t_.cq_entries - reserved;
        responder_rd_atomic_ = static_cast<uint8_t>(std::clamp(a.max_qp_rd_atom, 1, 16));
        initiator_rd_atomic_ = static_cast<uint8_t>(std::clamp(a.max_qp_init_rd_atom, 1, 16));
        max_msg_ = device_->portAttr().max_msg_sz ? device_->portAttr().max_msg_sz : (1u << 31);

        wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (wake_fd_ < 0) return Status::systemErrno("eventfd", errno);
        {
            ibv_context* c = device_->context();
            const int flags = ::fcntl(c->async_fd, F_GETFL);
            if (flags < 0 || ::fcntl(c->async_fd, F_SETFL, flags | O_NONBLOCK) != 0) {
                return Status::systemErrno("fcntl(O_NONBLOCK) on the async event fd", errno);
            }
        }
        KVXFER_ASSIGN_OR_RETURN(cq_, CompletionQueue::create(device_, static_cast<int>(t_.cq_entries)));
        KVXFER_ASSIGN_OR_RETURN(srq_, SharedReceiveQueue::create(device_, t_.recv_buffers));
        KVXFER_ASSIGN_OR_RETURN(
            recv_slab_,
            RegisteredSlab::create(device_, t_.recv_buffers, kNotifyBufferBytes, IBV_ACCESS_LOCAL_WRITE));
        KVXFER_ASSIGN_OR_RETURN(
            notify_slab_,
            RegisteredSlab::create(device_, t_.notify_slots, kNotifyBufferBytes, IBV_ACCESS_LOCAL_WRITE));
        KVXFER_ASSIGN_OR_RETURN(
            ud_slab_, RegisteredSlab::create(device_, kUdRecvDepth + kUdSendSlots,
                                             kGrhBytes + CmMessage::kMaxBytes, IBV_ACCESS_LOCAL_WRITE));
        KVXFER_ASSIGN_OR_RETURN(ud_qp_,
                                QueuePair::createUd(device_, cq_->cq(), kUdSendSlots, kUdRecvDepth, qkey_));
        for (uint32_t i = 0; i < t_.recv_buffers; ++i) KVXFER_RETURN_IF_ERROR(postSrqBuffer(i));
        for (uint32_t i = 0; i < kUdRecvDepth; ++i) KVXFER_RETURN_IF_ERROR(postUdBuffer(i));
        for (uint32_t i = 0; i < t_.notify_slots; ++i) free_notify_.push_back(static_cast<int>(i));
        for (uint32_t i = 0; i < kUdSendSlots; ++i)
            free_ud_send_.push_back(static_cast<int>(kUdRecvDepth + i));
        KVXFER_RETURN_IF_ERROR(cq_->arm());
        return Status::ok();
    }

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
    void enqueue(Command cmd) {
        bool must_wake = false;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (stopped_) return;
            commands_.push_back(std::move(cmd));
            must_wake = sleeping_;
        }
        if (must_wake) wake();
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
    Result<std::unique_ptr<QueuePair>> newRcQp() {
        QueuePair::RcCaps caps;
        caps.send_depth = t_.sq_depth;
        caps.max_send_sge = 1;
        caps.max_inline = 128;
        KVXFER_ASSIGN_OR_RETURN(auto qp, QueuePair::createRc(device_, cq_->cq(), srq_->srq(), caps));
        KVXFER_RETURN_IF_ERROR(qp->toInit(MemoryRegion::kRemoteAccess));
        return qp;
    }

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
    void onUdReceive(const ibv_wc& wc);
    void onAsyncEvents();

    // Connection manager.
    void onCm(const CmMessage& msg);
    void onConnectRequest(const CmMessage& msg);
    void onConnectReply(const CmMessage& msg);
    void onReject(const CmMessage& msg);
    void onDisconnect(const CmMessage& msg);
    void sendCm(const CmMessage& msg, const ibv_gid& gid, uint16_t lid, uint32_t qpn, uint32_t qkey);
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
    std::unique_ptr<RegisteredSlab> notify_slab_;
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

    // Progress thread only.
    std::map<uint64_t, std::shared_ptr<Connection>> initiated_;                      // by connection id
    std::map<std::pair<uint64_t, uint64_t>, std::shared_ptr<Connection>> accepted_;  // (peer instance, id)
    std::unordered_map<uint32_t, std::pair<Connection*, Slot*>> by_qpn_;
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
};

// ================================================================================================
// progress loop

void Shared::run() {
    std::vector<pollfd> fds(3);
    for (;;) {
        graveyard_.clear();  // may destroy the backend (on this thread): only flags are touched
        if (stop_.load(std::memory_order_acquire)) break;
        drainCommands();
        int found = pollCompletions();
        postWork();
        const auto now = Clock::now();
        handshakeTimers(now);
        // Cancellation is pushed (Backend::cancel -> kCancel); released connections are
        // checked while any drain.
        if (sweep_requested_ || !closing_.empty()) {
            sweep_requested_ = false;
            sweepAbandoned();
        }
        if (found > 0) continue;

        // Idle. Release finished jobs before waiting: they keep their engine alive (and so
        // the device open) for as long as they sit here. This may destroy the backend.
        graveyard_.clear();
        if (stop_.load(std::memory_order_acquire)) break;
        // Spin briefly, then arm the CQ and sleep on its channel.
        if (t_.spin_us > 0) {
            const auto spin_until = Clock::now() + std::chrono::microseconds(t_.spin_us);
            while (Clock::now() < spin_until && found == 0) {
                found = pollCompletions();
                std::lock_guard<std::mutex> lock(mutex_);
                if (!commands_.empty()) break;
            }
            if (found > 0) continue;
        }
        if (!cq_->arm().isOk()) {
            std::this_thread::sleep_for(1ms);
            continue;
        }
        if (pollCompletions() > 0) continue;
        int timeout_ms = 1000;  // nothing should need it, but never sleep unboundedly
        for (auto& [id, conn] : initiated_) {
            if (!conn->handshaking) continue;
            const auto next = std::min(conn->handshake_next, conn->handshake_deadline);
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(next - now);
            const int ms = static_cast<int>(std::clamp<int64_t>(left.count() + 1, 1, 1000));
            timeout_ms = std::min(timeout_ms, ms);
        }
        if (!closing_.empty()) timeout_ms = std::min(timeout_ms, 50);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (!commands_.empty() || stop_.load()) continue;
            sleeping_ = true;
        }
        fds[0] = {cq_->fd(), POLLIN, 0};
        fds[1] = {wake_fd_, POLLIN, 0};
        fds[2] = {device_->context()->async_fd, POLLIN, 0};
        const int n = ::poll(fds.data(), fds.size(), timeout_ms);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            sleeping_ = false;
        }
        if (n > 0) {
            if (fds[0].revents) cq_->drainEvents();
            if (fds[1].revents) {
                uint64_t v;
                (void)!::read(wake_fd_, &v, sizeof(v));
            }
            if (fds[2].revents) onAsyncEvents();
        }
    }
    // Shutdown: tell peers we initiated to drop their side, give the datagrams a moment.
    for (auto& [id, conn] : initiated_) {
        if (conn->state == ConnState::kReady) {
            CmMessage m;
            m.type = CmType::kDisconnect;
            m.conn_id = conn->id;
            m.src_instance = instance_;
            m.dst_instance = conn->peer_instance;
            sendCm(m, conn->remote.gid, conn->remote.lid, conn->remote.ud_qpn, conn->remote.qkey);
        }
    }
    const auto until = Clock::now() + 20ms;
    while (free_ud_send_.size() < kUdSendSlots && Clock::now() < until) {
        if (pollCompletions() == 0) std::this_thread::sleep_for(100us);
    }
    teardownConnections();
    // Anything still tracked (standalone notifications) ends now; its QP is gone.
    while (!works_.empty()) finishWork(*works_.front(), Status::canceled("ibverbs backend shut down"));
    graveyard_.clear();
}

void Shared::teardownConnections() {
    // QPs go before the CQ, SRQ and PD they use.
    for (auto* table : {&initiated_}) {
        for (auto& [id, conn] : *table) {
            for (auto& s : conn->slots) s.qp.reset();
        }
    }
    for (auto& [key, conn] : accepted_) {
        for (auto& s : conn->slots) s.qp.reset();
    }
    for (auto& conn : closing_) {
        for (auto& s : conn->slots) s.qp.reset();
    }
    by_qpn_.clear();
    initiated_.clear();
    accepted_.clear();
    closing_.clear();
    ready_queue_.clear();
}

void Shared::drainCommands() {
    std::vector<Command> cmds;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        cmds.swap(commands_);
    }
    for (auto& c : cmds) {
        switch (c.kind) {
            case Command::Kind::kSubmit:
                admitJob(c);
                break;
            case Command::Kind::kNotify:
                admitNotify(c);
                break;
            case Command::Kind::kConnect:
                startConnect(c);
                break;
            case Command::Kind::kAbortConnect:
                abortConnect(c.conn);
                break;
            case Command::Kind::kRelease:
                release(c.conn);
                break;
            case Command::Kind::kCancel:
                sweep_requested_ = true;
                break;
        }
    }
}

// ================================================================================================
// jobs

void Shared::admitJob(Command& cmd) {
    auto w = std::make_unique<Work>();
    Work& work = *w;
    work.job = std::move(cmd.job);
    work.conn = std::move(cmd.conn);
    works_.push_back(std::move(w));
    work_index_[&work] = std::prev(works_.end());
    const TransferJob& j = *work.job;
    work.opcode = j.op == Op::kWrite ? IBV_WR_RDMA_WRITE : IBV_WR_RDMA_READ;
    work.keys.reserve(j.parts.size());
    for (const JobPart& p : j.parts) {
        const RemoteKey& key = static_cast<IbRemoteRegion*>(p.remote.backend)->key;
        work.keys.push_back({static_cast<IbRegion*>(p.local.backend)->lkey(), key.rkey, key.address});
    }
    work.total = j.num_runs;
    if (deviceDead()) return finishWork(work, deviceDeadStatus());
    if (work.conn->state == ConnState::kDead) return finishWork(work, work.conn->deadStatus());
    advance(work);  // queues its data (or goes straight to the notification)
}

void Shared::admitNotify(Command& cmd) {
    auto w = std::make_unique<Work>();
    Work& work = *w;
    work.waiter = std::move(cmd.waiter);
    work.conn = std::move(cmd.conn);
    work.payload = std::move(cmd.payload);
    works_.push_back(std::move(w));
    work_index_[&work] = std::prev(works_.end());
    if (deviceDead()) return finishWork(work, deviceDeadStatus());
    if (work.conn->state == ConnState::kDead) return finishWork(work, work.conn->deadStatus());
    work.phase = Work::Phase::kNotifyQueued;
    enqueueWork(work);
}

void Shared::enqueueWork(Work& w) {
    if (w.queued) return;
    w.queued = true;
    Connection& c = *w.conn;
    c.queue.push_back(&w);
    if (!c.in_ready && c.registered) {
        c.in_ready = true;
        ready_queue_.push_back(&c);
    }
}

void Shared::finishWork(Work& w, Status st) {
    if (w.phase == Work::Phase::kFinished) return;
    w.phase = Work::Phase::kFinished;
    if (w.queued) {
        auto& q = w.conn->queue;
        q.erase(std::remove(q.begin(), q.end(), &w), q.end());
        w.queued = false;
    }
    if (w.notify_slot >= 0) {
        free_notify_.push_back(w.notify_slot);
        w.notify_slot = -1;
    }
    if (w.job) w.job->finish(std::move(st));
    if (w.waiter) w.waiter->set(std::move(st));
    auto it = work_index_.find(&w);
    if (it != work_index_.end()) {
        graveyard_.push_back(std::move(*it->second));
        works_.erase(it->second);
        work_index_.erase(it);
    }
}

// Moves a work forward once nothing of it is outstanding.
void Shared::advance(Work& w) {
    if (w.phase == Work::Phase::kFinished || w.outstanding > 0) return;
    if (w.phase == Work::Phase::kNotifyPosted) return finishWork(w, w.error);
    if (w.phase == Work::Phase::kNotifyQueued) {
        if (!w.error.isOk()) return finishWork(w, w.error);
        return;  // waits in its connection's queue
    }
    // Data phase: more to post, or the data outcome goes to the core's job machine.
    const bool running = w.error.isOk() && !w.stopped && !(w.job && w.job->abandoned());
    if (running && w.dataLeft()) {
        enqueueWork(w);
        return;
    }
    if (w.job) {
        Status fin;
        const bool all_moved = running && !w.dataLeft();
        if (w.job->decideAfterData(w.error, all_moved, &fin) == TransferJob::AfterData::kFinished) {
            return finishWork(w, std::move(fin));
        }
    } else if (!w.error.isOk()) {
        return finishWork(w, w.error);
    } else if (w.payload.empty()) {
        return finishWork(w, Status::ok());
    }
    w.phase = Work::Phase::kNotifyQueued;
    enqueueWork(w);
}

void Shared::sweepAbandoned() {
    // Deadlines and cancellation: stop posting; finish once nothing is outstanding.
    std::vector<Work*> check;
    for (auto& w : works_) {
        if (w->phase == Work::Phase::kData && w->job && !w->stopped && w->job->abandoned())
            check.push_back(w.get());
    }
    for (Work* w : check) {
        w->stopped = true;
        if (w->queued) {
            auto& q = w->conn->queue;
            q.erase(std::remove(q.begin(), q.end(), w), q.end());
            w->queued = false;
        }
        advance(*w);
    }
    // Released connections are destroyed once drained.
    for (size_t i = 0; i < closing_.size();) {
        bool busy = false;
        for (auto& s : closing_[i]->slots) busy |= !s.window.empty();
        if (!busy) {
            unregisterConnection(*closing_[i]);
            closing_.erase(closing_.begin() + static_cast<long>(i));
        } else {
            ++i;
        }
    }
}

void Shared::failEverything(Status st) {
    for (auto& [id, conn] : initiated_) {
        connectionDead(*conn, st);
        for (auto& s : conn->slots) {
            s.window.reset();  // nothing will complete: forget the works it referenced
            s.state = SlotState::kDead;
        }
    }
    for (auto& c : closing_) {
        for (auto& s : c->slots) s.window.reset();
    }
    send_in_flight_ = 0;
    std::vector<Work*> all;
    for (auto& w : works_) all.push_back(w.get());
    // The device is gone: no WR will complete and none can touch memory any more.
    for (Work* w : all) {
        w->outstanding = 0;
        if (w->error.isOk()) w->error = st;
        finishWork(*w, st);
    }
}

// ================================================================================================
// posting

Slot* Shared::pickSlot(Connection& conn, bool need_notify) {
    const size_t n = conn.slots.size();
    for (size_t k = 0; k < n; ++k) {
        Slot& s = conn.slots[(conn.next_slot + k) % n];
        if (s.state != SlotState::kReady || s.window.room() == 0) continue;
        (void)need_notify;
        conn.next_slot = (conn.next_slot + k + 1) % n;
        return &s;
    }
    return nullptr;
}

void Shared::postWork() {
    if (deviceDead()) return;
    size_t rounds = ready_queue_.size();
    while (rounds-- > 0 && !ready_queue_.empty()) {
        Connection* c = ready_queue_.front();
        ready_queue_.pop_front();
        c->in_ready = false;
        // Works are freed only at the top of the progress loop, so `w` stays valid here even
        // if it finished meanwhile; the queue itself may change under any call below.
        auto pop = [c](Work* w) {
            if (!c->queue.empty() && c->queue.front() == w) {
                c->queue.pop_front();
                w->queued = false;
            }
        };
        bool blocked = false;
        while (!c->queue.empty() && !blocked) {
            Work* w = c->queue.front();
            if (w->phase == Work::Phase::kData) {
                if (w->job && w->job->abandoned()) w->stopped = true;
                if (!w->stopped && w->error.isOk()) blocked = !postFrom(*c, *w);
                if (!w->dataLeft() || w->stopped || !w->error.isOk()) {
                    pop(w);
                    advance(*w);
                }
            } else if (w->phase == Work::Phase::kNotifyQueued) {
                if (!postNotify(*c, *w)) {
                    blocked = true;
                } else {
                    pop(w);
                    advance(*w);
                }
            } else {
                pop(w);
            }
        }
        if (!c->queue.empty() && !c->in_ready && c->registered) {
            c->in_ready = true;
            ready_queue_.push_back(c);
        }
    }
}

// Posts as much of `w` as windows allow, spreading chains over the connection's QPs.
// False when blocked (no room); true when everything was posted or the work stopped.
bool Shared::postFrom(Connection& conn, Work& w) {
    PostList list;
    const TransferJob& job = *w.job;
    while (w.dataLeft() && !w.stopped && w.error.isOk()) {
        if (send_in_flight_ >= send_budget_) return false;
        Slot* s = pickSlot(conn, false);
        if (s == nullptr) return false;
        // Next contiguous range of units.
        uint64_t first, end;
        if (!w.redo.empty()) {
            first = w.redo.back().first;
            end = w.redo.back().second;
        } else {
            first = w.next;
            end = w.total;
        }
        const uint64_t room =
            std::min<uint64_t>({s->window.room(), t_.chain_max, send_budget_ - send_in_flight_});
        end = std::min(end, first + room);
        list.clear();
        const uint64_t seq0 = s->window.nextSeq();
        Status bad;
        for (uint64_t u = first; u < end; ++u) {
            const FlatRun r = job.run(u);
            if (r.length > max_msg_ || r.length > 0xffffffffu) {
                bad = Status::internal("plan run of " + std::to_string(r.length) +
                                       " bytes exceeds the port's maximum message size");
                end = u;
                break;
            }
            const uint32_t i = static_cast<uint32_t>(u - first);
            const Work::Keys& k = w.keys[r.part];
            list.addRdma(w.opcode, makeWrId(WrKind::kRcSend, seq0 + i), reinterpret_cast<uint64_t>(r.local),
                         static_cast<uint32_t>(r.length), k.lkey, k.remote_base + r.remote_offset, k.rkey,
                         s->window.wantSignal(i));
        }
        if (list.size() > 0) {
            list.signalLast();
            ibv_send_wr* bad_wr = nullptr;
            Status st = s->qp->post(list.link(), &bad_wr);
            size_t posted = list.size();
            if (!st.isOk()) posted = list.indexOf(bad_wr);
            if (posted > 0) {
                // A partial post leaves an unsignaled tail: make it visible by failing the slot,
                // which flushes (and so retires) everything.
                s->window.record(&w, first, static_cast<uint32_t>(posted), 0);
                w.outstanding += posted;
                send_in_flight_ += posted;
            }
            if (!w.redo.empty()) {
                auto& r = w.redo.back();
                r.first += posted;
                if (r.first >= r.second) w.redo.pop_back();
            } else {
                w.next += posted;
            }
            if (!st.isOk()) {
                if (w.error.isOk()) w.error = st;
                w.stopped = true;
                failSlot(conn, *s, st, false);
                return true;
            }
        }
        if (!bad.isOk()) {
            if (w.error.isOk()) w.error = bad;
            w.stopped = true;
            return true;
        }
    }
    return true;
}

bool Shared::postNotify(Connection& conn, Work& w) {
    if (send_in_flight_ >= send_budget_) return false;
    if (w.notify_slot < 0) {
        if (free_notify_.empty()) return false;
        w.notify_slot = free_notify_.back();
        free_notify_.pop_back();
        const Bytes& p = w.notifyPayload();
        uint8_t* buf = notify_slab_->slot(static_cast<size_t>(w.notify_slot));
        writeNotifyHeader(buf, static_cast<uint32_t>(p.size()));
        if (!p.empty()) std::memcpy(buf + NotifyHeader::kBytes, p.data(), p.size());
    }
    Slot* s = pickSlot(conn, true);
    if (s == nullptr) return false;
    const uint32_t len = static_cast<uint32_t>(NotifyHeader::kBytes + w.notifyPayload().size());
    PostList list;
    const uint64_t seq = s->window.nextSeq();
    list.addSend(makeWrId(WrKind::kRcSend, seq),
                 reinterpret_cast<uint64_t>(notify_slab_->slot(static_cast<size_t>(w.notify_slot))), len,
                 notify_slab_->lkey(), true, len <= s->qp->maxInline());
    ibv_send_wr* bad = nullptr;
    Status st = s->qp->post(list.link(), &bad);
    if (!st.isOk()) {
        if (w.error.isOk()) w.error = st;
        w.phase = Work::Phase::kNotifyPosted;  // nothing outstanding: advance() finishes it
        failSlot(conn, *s, st, false);
        return true;
    }
    s->window.record(&w, kNotifyUnit, 1, 0);
    w.outstanding += 1;
    send_in_flight_ += 1;
    w.phase = Work::Phase::kNotifyPosted;
    return true;
}

// ================================================================================================
// completions

int Shared::pollCompletions() {
    ibv_wc wc[32];
    int total = 0;
    for (int round = 0; round < 16; ++round) {
        const int n = cq_->poll(wc, 32);
        if (n < 0) {
            // The CQ is unusable (device gone): nothing more will complete.
            if (!deviceDead()) {
                {
                    std::lock_guard<std::mutex> lock(mutex_);
                    device_dead_status_ = Status::system("ibv_poll_cq failed on " + device_->name() +
                                                         ": the device is no longer usable");
                }
                device_dead_.store(true);
                failEverything(deviceDeadStatus());
            }
            return total;
        }
        for (int i = 0; i < n; ++i) onCompletion(wc[i]);
        total += n;
        if (n < 32) break;
    }
    return total;
}

void Shared::onCompletion(const ibv_wc& wc) {
    switch (wrKind(wc.wr_id)) {
        case WrKind::kRcSend:
            onRcSendCompletion(wc);
            break;
        case WrKind::kSrqRecv:
            onSrqReceive(wc);
            break;
        case WrKind::kUdRecv:
            onUdReceive(wc);
            break;
        case WrKind::kUdSend:
            free_ud_send_.push_back(static_cast<int>(wrValue(wc.wr_id)));
            break;
    }
}

void Shared::retireOk(Slot& slot, uint64_t upto) {
    std::vector<Work*> touched;
    slot.window.retire(upto, [&](void* owner, uint64_t, uint32_t n) {
        auto* w = static_cast<Work*>(owner);
        w->outstanding -= n;
        send_in_flight_ -= n;
        touched.push_back(w);
    });
    for (Work* w : touched) advance(*w);
}

void Shared::retireFlushed(Slot& slot, uint64_t upto) {
    std::vector<Work*> touched;
    slot.window.retire(upto, [&](void* owner, uint64_t unit, uint32_t n) {
        auto* w = static_cast<Work*>(owner);
        w->outstanding -= n;
        send_in_flight_ -= n;
        touched.push_back(w);
        if (w->phase == Work::Phase::kFinished) return;
        const bool redo = unit != kNotifyUnit && slot.remote_fault && w->error.isOk() && !w->stopped &&
                          w->phase == Work::Phase::kData;
        if (redo) {
            w->redo.emplace_back(unit, unit + n);  // another work's fault broke the QP: post again
            debugLog("re-posting %u flushed runs of an innocent transfer", n);
            enqueueWork(*w);
        } else if (w->error.isOk()) {
            w->error = slot.error;
        }
    });
    for (Work* w : touched) advance(*w);
}

void Shared::onRcSendCompletion(const ibv_wc& wc) {
    auto it = by_qpn_.find(wc.qp_num);
    if (it == by_qpn_.end()) return;
    Connection& conn = *it->second.first;
    Slot& slot = *it->second.second;
    const uint64_t seq = wrValue(wc.wr_id);
    if (!slot.window.contains(seq)) return;
    const bool healthy = slot.state == SlotState::kReady;
    if (wc.status == IBV_WC_SUCCESS) {
        if (healthy) {
            retireOk(slot, seq);
        } else {
            retireFlushed(slot, seq);
        }
    } else if (wc.status == IBV_WC_WR_FLUSH_ERR) {
        if (healthy) {
            Status st =
                portIsDown()
                    ? Status::peerUnreachable("ibverbs: port " + std::to_string(device_->port()) + " of " +
                                              device_->name() + " went down; work requests were flushed")
                    : Status::peerUnreachable("ibverbs: QP 0x" + hex(wc.qp_num) + " to peer '" +
                                              conn.peer_name + "' entered the error state (flushed)");
            failSlot(conn, slot, st, false);
        }
        retireFlushed(slot, seq);
    } else {
        // A real error at `seq`: everything before it completed; it failed.
        if (seq > slot.window.oldest()) {
            if (healthy) {
                retireOk(slot, seq - 1);
            } else {
                retireFlushed(slot, seq - 1);
            }
        }
        auto* owner = static_cast<Work*>(slot.window.ownerOf(seq));
        std::string what = "ibverbs ";
        if (owner != nullptr && owner->phase == Work::Phase::kNotifyPosted) {
            what += "notification SEND";
        } else if (owner != nullptr && owner->job) {
            what += std::string("RDMA ") + opName(owner->job->op);
        } else {
            what += "work request";
        }
        what += " to peer '" + conn.peer_name + "'";
        Status st = completionError(verbs_, wc, what);
        if (st.code() == StatusCode::kSystem && portIsDown()) {
            st = Status::peerUnreachable(st.message() + " (port " + std::to_string(device_->port()) + " of " +
                                         device_->name() + " is down)");
        }
        const bool remote_fault = isRemoteFault(wc.status);
        if (owner != nullptr && owner->error.isOk()) owner->error = st;
        if (healthy) failSlot(conn, slot, st, remote_fault);
        retireFlushed(slot, seq);
    }
    if (slot.state == SlotState::kFailed && slot.window.empty()) slotDrained(conn, slot);
}

void Shared::failSlot(Connection& conn, Slot& slot, Status st, bool remote_fault) {
    if (slot.state != SlotState::kReady) return;
    debugLog("peer '%s' QP slot %d (qpn 0x%x) failed, %u WRs outstanding: %s", conn.peer_name.c_str(),
             slot.index, slot.qp ? slot.qp->qpn() : 0, slot.window.inFlight(), st.toString().c_str());
    slot.state = SlotState::kFailed;
    slot.error = std::move(st);
    slot.remote_fault = remote_fault;
    if (slot.qp) (void)slot.qp->toError();  // flush the rest promptly
    if (slot.window.empty()) slotDrained(conn, slot);
}

void Shared::slotDrained(Connection& conn, Slot& slot) {
    slot.state = SlotState::kBroken;
    if (conn.released || conn.state == ConnState::kDead) {
        slot.state = SlotState::kDead;
        return;
    }
    // Replace the QP through the connection manager. A dead peer does not answer, and the
    // connection dies after repair_timeout; a live one (remote fault) is usable again.
    startRepair(conn);
}

void Shared::connectionDead(Connection& conn, Status st) {
    if (conn.state == ConnState::kDead) return;
    debugLog("peer '%s': connection dead: %s", conn.peer_name.c_str(), st.toString().c_str());
    conn.state = ConnState::kDead;
    conn.handshaking = false;
    conn.markDead(st);
    for (auto& s : conn.slots) {
        if (s.state == SlotState::kReady || s.state == SlotState::kIdle || s.state == SlotState::kRepairing ||
            s.state == SlotState::kBroken) {
            if (s.state == SlotState::kReady && s.qp) (void)s.qp->toError();
            if (s.window.empty()) {
                s.state = SlotState::kDead;
            } else {
                s.state = SlotState::kFailed;
                if (s.error.isOk()) s.error = st;
            }
        }
    }
    // Queued work cannot go anywhere: fail it once its outstanding WRs retire.
    std::vector<Work*> queued(conn.queue.begin(), conn.queue.end());
    conn.queue.clear();
    for (Work* w : queued) {
        w->queued = false;
        w->redo.clear();
        w->stopped = true;
        if (w->error.isOk()) w->error = st;
        if (w->phase == Work::Phase::kNotifyQueued) w->phase = Work::Phase::kNotifyPosted;
        advance(*w);
    }
}

void Shared::onSrqReceive(const ibv_wc& wc) {
    const uint32_t index = static_cast<uint32_t>(wrValue(wc.wr_id));
    if (index >= t_.recv_buffers) return;
    if (wc.status == IBV_WC_SUCCESS) {
        auto it = by_qpn_.find(wc.qp_num);
        if (it != by_qpn_.end() && !stop_.load(std::memory_order_acquire)) {
            Connection& conn = *it->second.first;
            ByteView msg(recv_slab_->slot(index), wc.byte_len);
            if (auto payload = parseNotify(msg)) {
                sink_->deliver(conn.peer_name, conn.peer_instance, Bytes(payload->begin(), payload->end()));
            }
        }
    }
    if (!stop_.load(std::memory_order_acquire) && !deviceDead()) (void)postSrqBuffer(index);
}

void Shared::onUdReceive(const ibv_wc& wc) {
    const uint32_t index = static_cast<uint32_t>(wrValue(wc.wr_id));
    if (index >= kUdRecvDepth) return;
    if (wc.status == IBV_WC_SUCCESS && wc.byte_len > kGrhBytes) {
        ByteView msg(ud_slab_->slot(index) + kGrhBytes, wc.byte_len - kGrhBytes);
        if (auto m = decodeCm(msg)) onCm(*m);
    }
    if (!deviceDead()) (void)postUdBuffer(index);
}

void Shared::onAsyncEvents() {
    for (;;) {
        ibv_async_event ev{};
        if (verbs_.get_async_event(device_->context(), &ev) != 0) return;
        const ibv_event_type type = ev.event_type;
        const bool our_port = ev.element.port_num == device_->port();
        verbs_.ack_async_event(&ev);
        switch (type) {
            case IBV_EVENT_DEVICE_FATAL:
            case IBV_EVENT_CQ_ERR: {
                Status st = Status::system("ibverbs: " + std::string(verbs_.eventText(type)) + " on " +
                                           device_->name() + "; the backend cannot move data any more");
                {
                    std::lock_guard<std::mutex> lock(mutex_);
                    device_dead_status_ = st;
                }
                device_dead_.store(true);
                failEverything(st);
                break;
            }
            case IBV_EVENT_PORT_ERR:
                if (our_port) port_down_.store(true);
                break;
            case IBV_EVENT_PORT_ACTIVE:
                if (our_port) port_down_.store(false);
                break;
            default:
                break;  // QP events surface as completions; the rest needs no action
        }
    }
}

// ================================================================================================
// connection manager

void Shared::sendCm(const CmMessage& msg, const ibv_gid& gid, uint16_t lid, uint32_t qpn, uint32_t qkey) {
    if (free_ud_send_.empty() || deviceDead()) return;  // a datagram may be lost anyway: callers retry
    const std::string key(reinterpret_cast<const char*>(gid.raw), 16);
    auto& ah = ud_ahs_[{key, lid}];
    if (!ah) {
        auto created = AddressHandle::create(device_, gid, lid);
        if (!created.isOk()) {
            ud_ahs_.erase({key, lid});
            return;
        }
        ah = std::move(created).value();
    }
    const Bytes bytes = encodeCm(msg);
    const int slot = free_ud_send_.back();
    uint8_t* buf = ud_slab_->slot(static_cast<size_t>(slot));
    std::memcpy(buf, bytes.data(), bytes.size());
    ibv_sge sge{reinterpret_cast<uint64_t>(buf), static_cast<uint32_t>(bytes.size()), ud_slab_->lkey()};
    ibv_send_wr wr{};
    wr.wr_id = makeWrId(WrKind::kUdSend, static_cast<uint64_t>(slot));
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_SEND;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr.ud.ah = ah->ah();
    wr.wr.ud.remote_qpn = qpn;
    wr.wr.ud.remote_qkey = qkey;
    ibv_send_wr* bad = nullptr;
    if (ud_qp_->post(&wr, &bad).isOk()) free_ud_send_.pop_back();
}

CmMessage Shared::requestFor(Connection& conn) const {
    CmMessage m;
    m.type = CmType::kConnectRequest;
    m.conn_id = conn.id;
    m.src_instance = instance_;
    m.dst_instance = conn.peer_instance;
    m.gid = device_->gid();
    m.ud_qpn = ud_qp_->qpn();
    m.qkey = qkey_;
    m.lid = device_->portAttr().lid;
    m.mtu = static_cast<uint8_t>(device_->activeMtu());
    m.rd_atomic = responder_rd_atomic_;
    m.generation = conn.generation;
    for (const auto& s : conn.slots) m.qps.push_back({s.qp ? s.qp->qpn() : 0, s.qp ? s.qp->initialPsn() : 0});
    m.name = name_;
    return m;
}

void Shared::sendRequest(Connection& conn) {
    sendCm(requestFor(conn), conn.remote.gid, conn.remote.lid, conn.remote.ud_qpn, conn.remote.qkey);
}

void Shared::registerConnection(const std::shared_ptr<Connection>& conn) {
    if (conn->initiator) {
        initiated_[conn->id] = conn;
    } else {
        accepted_[{conn->peer_instance, conn->id}] = conn;
    }
    for (auto& s : conn->slots) {
        if (s.qp) by_qpn_[s.qp->qpn()] = {conn.get(), &s};
    }
    conn->registered = true;
}

void Shared::unregisterConnection(Connection& conn) {
    for (auto& s : conn.slots) {
        if (s.qp) by_qpn_.erase(s.qp->qpn());
        s.qp.reset();
    }
    ready_queue_.erase(std::remove(ready_queue_.begin(), ready_queue_.end(), &conn), ready_queue_.end());
    conn.in_ready = false;
    conn.registered = false;
}

void Shared::startConnect(Command& cmd) {
    auto conn = cmd.conn;
    conn->connect_waiter = cmd.waiter;
    if (deviceDead()) {
        conn->connect_waiter->set(deviceDeadStatus());
        return;
    }
    registerConnection(conn);
    conn->handshaking = true;
    conn->handshake_deadline = cmd.deadline;
    conn->handshake_interval = 100ms;
    conn->handshake_next = Clock::now() + conn->handshake_interval;
    sendRequest(*conn);
}

void Shared::handshakeTimers(Clock::time_point now) {
    std::vector<Connection*> expired;
    for (auto& [id, conn] : initiated_) {
        if (!conn->handshaking) continue;
        if (now >= conn->handshake_deadline) {
            expired.push_back(conn.get());
        } else if (now >= conn->handshake_next) {
            sendRequest(*conn);
            conn->handshake_interval =
                std::min<std::chrono::milliseconds>(conn->handshake_interval * 2, 1000ms);
            conn->handshake_next = now + conn->handshake_interval;
        }
    }
    for (Connection* c : expired) {
        c->handshaking = false;
        const bool first = c->state == ConnState::kConnecting;
        connectFailed(*c, Status::peerUnreachable(
                              std::string("ibverbs: peer '") + c->peer_name + "' did not answer " +
                              (first ? "the connection request" : "the queue-pair repair request") +
                              " (UD QPN 0x" + hex(c->remote.ud_qpn) + " at GID " +
                              gidToString(c->remote.gid) + "); is it running and reachable on this fabric?"));
    }
}

void Shared::connectFailed(Connection& conn, Status st) {
    conn.handshaking = false;
    if (conn.state == ConnState::kConnecting) {
        conn.state = ConnState::kDead;
        conn.markDead(st);
        if (conn.connect_waiter) conn.connect_waiter->set(st);
        conn.connect_waiter.reset();
        // The connect() caller aborts and drops it; its QPs go with the last reference.
        return;
    }
    // A repair failed: the repairing slots are dead.
    bool any = false;
    for (auto& s : conn.slots) {
        if (s.state == SlotState::kRepairing || s.state == SlotState::kBroken) s.state = SlotState::kDead;
        any |= s.state == SlotState::kReady;
    }
    if (!any) connectionDead(conn, st);
}

void Shared::abortConnect(const std::shared_ptr<Connection>& conn) {
    if (conn->registered) {
        if (conn->state == ConnState::kReady) {
            CmMessage m;
            m.type = CmType::kDisconnect;
            m.conn_id = conn->id;
            m.src_instance = instance_;
            m.dst_instance = conn->peer_instance;
            sendCm(m, conn->remote.gid, conn->remote.lid, conn->remote.ud_qpn, conn->remote.qkey);
        }
        conn->handshaking = false;
        conn->state = ConnState::kDead;
        unregisterConnection(*conn);
        initiated_.erase(conn->id);
    }
}

void Shared::release(const std::shared_ptr<Connection>& conn) {
    conn->released = true;
    if (!conn->registered) return;
    if (conn->state == ConnState::kReady) {
        CmMessage m;
        m.type = CmType::kDisconnect;
        m.conn_id = conn->id;
        m.src_instance = instance_;
        m.dst_instance = conn->peer_instance;
        sendCm(m, conn->remote.gid, conn->remote.lid, conn->remote.ud_qpn, conn->remote.qkey);
    }
    conn->handshaking = false;
    initiated_.erase(conn->id);
    // Standalone notifications may still be in flight: drain before destroying the QPs.
    bool busy = false;
    for (auto& s : conn->slots) {
        if (!s.window.empty()) {
            busy = true;
            if (s.qp && s.state == SlotState::kReady) (void)s.qp->toError();
        }
    }
    if (busy) {
        closing_.push_back(conn);
    } else {
        unregisterConnection(*conn);
    }
}

void Shared::startRepair(Connection& conn) {
    bool any = false;
    for (auto& s : conn.slots) {
        if (s.state != SlotState::kBroken) continue;
        if (s.qp) by_qpn_.erase(s.qp->qpn());
        s.qp.reset();
        QueuePair::RcCaps caps;
        caps.send_depth = t_.sq_depth;
        caps.max_send_sge = 1;
        auto qp = QueuePair::createRc(device_, cq_->cq(), srq_->srq(), caps);
        if (qp.isOk() && (*qp)->toInit(MemoryRegion::kRemoteAccess).isOk()) {
            s.qp = std::move(qp).value();
            s.window = SendWindow(s.qp->sendDepth(), t_.signal_interval);
            s.state = SlotState::kRepairing;
            by_qpn_[s.qp->qpn()] = {&conn, &s};
            any = true;
        } else {
            s.state = SlotState::kDead;
        }
    }
    if (!any) {
        bool ready = false;
        for (auto& s : conn.slots) ready |= s.state == SlotState::kReady || s.state == SlotState::kRepairing;
        if (!ready) {
            connectionDead(conn,
                           Status::peerUnreachable("ibverbs: every queue pair to peer '" + conn.peer_name +
                                                   "' failed and could not be replaced"));
        }
        return;
    }
    ++conn.generation;
    debugLog("peer '%s': repairing queue pairs (generation %u)", conn.peer_name.c_str(), conn.generation);
    conn.handshaking = true;
    conn.handshake_deadline = Clock::now() + t_.repair_timeout;
    conn.handshake_interval = 100ms;
    conn.handshake_next = Clock::now() + conn.handshake_interval;
    sendRequest(conn);
}

Status Shared::connectSlot(Connection& conn, Slot& slot, const QpEndpoint& remote) {
    RcPath path;
    path.remote_qpn = remote.qpn;
    path.remote_psn = remote.psn;
    path.mtu = conn.mtu;
    path.remote_gid = conn.remote.gid;
    path.remote_lid = conn.remote.lid;
    path.max_dest_rd_atomic = responder_rd_atomic_;
    path.min_rnr_timer = t_.min_rnr_timer;
    path.traffic_class = t_.traffic_class;
    path.service_level = t_.service_level;
    KVXFER_RETURN_IF_ERROR(slot.qp->toRtr(path));
    RcTiming timing = t_.timing;
    timing.max_rd_atomic = std::min(initiator_rd_atomic_, conn.remote_rd_atomic);
    KVXFER_RETURN_IF_ERROR(slot.qp->toRts(timing));
    slot.remote_qpn = remote.qpn;
    slot.remote_psn = remote.psn;
    slot.window = SendWindow(slot.qp->sendDepth(), t_.signal_interval);
    slot.state = SlotState::kReady;
    slot.error = Status::ok();
    slot.remote_fault = false;
    return Status::ok();
}

void Shared::onCm(const CmMessage& msg) {
    switch (msg.type) {
        case CmType::kConnectRequest:
            onConnectRequest(msg);
            break;
        case CmType::kConnectReply:
            onConnectReply(msg);
            break;
        case CmType::kReject:
            onReject(msg);
            break;
        case CmType::kDisconnect:
            onDisconnect(msg);
            break;
    }
}

void Shared::onConnectRequest(const CmMessage& req) {
    auto reject = [&](RejectReason why, std::string text) {
        CmMessage m;
        m.type = CmType::kReject;
        m.conn_id = req.conn_id;
        m.src_instance = instance_;
        m.dst_instance = req.src_instance;
        m.reason = why;
        m.text = std::move(text);
        sendCm(m, req.gid, req.lid, req.ud_qpn, req.qkey);
    };
    if (req.dst_instance != 0 && req.dst_instance != instance_) {
        return reject(RejectReason::kWrongInstance, "engine '" + name_ + "' is instance " + hex(instance_) +
                                                        ", not " + hex(req.dst_instance) +
                                                        " (the descriptor is stale: the engine restarted)");
    }
    if (req.mtu < IBV_MTU_256 || req.mtu > IBV_MTU_4096 || req.qps.empty()) {
        return reject(RejectReason::kIncompatible, "bad MTU or queue-pair count");
    }
    if (stop_.load()) return reject(RejectReason::kShuttingDown, "engine '" + name_ + "' is closing");
    const auto key = std::make_pair(req.src_instance, req.conn_id);
    auto it = accepted_.find(key);
    std::shared_ptr<Connection> conn;
    if (it == accepted_.end()) {
        // A peer restarted under the same name: its old connections are dead.
        for (auto i = accepted_.begin(); i != accepted_.end();) {
            if (i->second->peer_name == req.name && i->second->peer_instance != req.src_instance) {
                unregisterConnection(*i->second);
                i = accepted_.erase(i);
            } else {
                ++i;
            }
        }
        conn = std::make_shared<Connection>();
        conn->id = req.conn_id;
        conn->initiator = false;
        conn->peer_name = req.name;
        conn->peer_instance = req.src_instance;
        conn->remote.gid = req.gid;
        conn->remote.lid = req.lid;
        conn->remote.ud_qpn = req.ud_qpn;
        conn->remote.qkey = req.qkey;
        conn->mtu = static_cast<ibv_mtu>(std::min<int>(req.mtu, device_->activeMtu()));
        conn->remote_rd_atomic = std::max<uint8_t>(1, req.rd_atomic);
        conn->generation = req.generation;
        conn->slots.resize(req.qps.size());
        for (size_t i = 0; i < req.qps.size(); ++i) {
            Slot& s = conn->slots[i];
            s.index = static_cast<int>(i);
            auto qp = newRcQp();
            if (!qp.isOk()) return reject(RejectReason::kResources, qp.status().message());
            s.qp = std::move(qp).value();
            Status st = connectSlot(*conn, s, req.qps[i]);
            if (!st.isOk()) return reject(RejectReason::kResources, st.message());
        }
        conn->state = ConnState::kReady;
        registerConnection(conn);
        debugLog("accepted %zu QPs from '%s' (instance %llx)", conn->slots.size(), conn->peer_name.c_str(),
                 static_cast<unsigned long long>(conn->peer_instance));
    } else {
        conn = it->second;
        if (req.generation < conn->generation || req.qps.size() != conn->slots.size())
            return;  // stale duplicate
        if (req.generation > conn->generation) {
            // Repair: replace every QP whose peer QP changed.
            for (size_t i = 0; i < req.qps.size(); ++i) {
                Slot& s = conn->slots[i];
                if (s.remote_qpn == req.qps[i].qpn && s.qp) continue;
                if (s.qp) by_qpn_.erase(s.qp->qpn());
                s.qp.reset();
                auto qp = newRcQp();
                if (!qp.isOk()) return reject(RejectReason::kResources, qp.status().message());
                s.qp = std::move(qp).value();
                Status st = connectSlot(*conn, s, req.qps[i]);
                if (!st.isOk()) return reject(RejectReason::kResources, st.message());
                by_qpn_[s.qp->qpn()] = {conn.get(), &s};
            }
            conn->generation = req.generation;
        }
    }
    CmMessage rep;
    rep.type = CmType::kConnectReply;
    rep.conn_id = conn->id;
    rep.src_instance = instance_;
    rep.dst_instance = conn->peer_instance;
    rep.gid = device_->gid();
    rep.ud_qpn = ud_qp_->qpn();
    rep.qkey = qkey_;
    rep.lid = device_->portAttr().lid;
    rep.mtu = static_cast<uint8_t>(conn->mtu);
    rep.rd_atomic = responder_rd_atomic_;
    rep.generation = conn->generation;
    for (const auto& s : conn->slots) rep.qps.push_back({s.qp->qpn(), s.qp->initialPsn()});
    rep.name = name_;
    sendCm(rep, req.gid, req.lid, req.ud_qpn, req.qkey);
}

void Shared::onConnectReply(const CmMessage& rep) {
    auto it = initiated_.find(rep.conn_id);
    if (it == initiated_.end()) return;
    Connection& conn = *it->second;
    if (!conn.handshaking || rep.generation != conn.generation || rep.src_instance != conn.peer_instance ||
        rep.dst_instance != instance_ || rep.qps.size() != conn.slots.size()) {
        return;  // stale or foreign
    }
    conn.handshaking = false;
    const bool first = conn.state == ConnState::kConnecting;
    debugLog("peer '%s': %s reply, generation %u, MTU %u", conn.peer_name.c_str(),
             first ? "connect" : "repair", rep.generation, mtuBytes(static_cast<ibv_mtu>(rep.mtu)));
    if (first) {
        conn.mtu = static_cast<ibv_mtu>(std::clamp<int>(rep.mtu, IBV_MTU_256, device_->activeMtu()));
        conn.remote_rd_atomic = std::max<uint8_t>(1, rep.rd_atomic);
    }
    Status failure;
    for (size_t i = 0; i < conn.slots.size(); ++i) {
        Slot& s = conn.slots[i];
        if (s.state != SlotState::kIdle && s.state != SlotState::kRepairing) continue;
        Status st = connectSlot(conn, s, rep.qps[i]);
        if (!st.isOk()) {
            s.state = SlotState::kDead;
            if (failure.isOk()) failure = st;
        }
    }
    bool any = false;
    for (auto& s : conn.slots) any |= s.state == SlotState::kReady;
    if (first) {
        if (!any)
            return connectFailed(conn,
                                 failure.isOk() ? Status::internal("no queue pair connected") : failure);
        conn.state = ConnState::kReady;
        if (conn.connect_waiter) conn.connect_waiter->set(Status::ok());
        conn.connect_waiter.reset();
    } else if (!any) {
        connectionDead(conn, failure);
    }
    if (!conn.queue.empty() && !conn.in_ready && conn.registered) {
        conn.in_ready = true;
        ready_queue_.push_back(&conn);
    }
}

void Shared::onReject(const CmMessage& rej) {
    auto it = initiated_.find(rej.conn_id);
    if (it == initiated_.end() || !it->second->handshaking || rej.src_instance == 0) return;
    Connection& conn = *it->second;
    const Status st =
        rej.reason == RejectReason::kWrongInstance
            ? Status::peerUnreachable("ibverbs: peer '" + conn.peer_name + "' refused: " + rej.text)
            : Status::remote("ibverbs: peer '" + conn.peer_name + "' refused the connection: " + rej.text);
    connectFailed(conn, st);
}

void Shared::onDisconnect(const CmMessage& msg) {
    auto it = accepted_.find({msg.src_instance, msg.conn_id});
    if (it == accepted_.end()) return;
    unregisterConnection(*it->second);
    accepted_.erase(it);
}

// ================================================================================================
// the backend

class IbPeer final : public BackendPeer {
public:
    IbPeer(std::shared_ptr<Shared> shared, std::shared_ptr<Connection> conn)
        : shared(std::move(shared)), conn(std::move(conn)) {}
    ~IbPeer() override {
        Command c{Command::Kind::kRelease, nullptr, conn, nullptr, {}, {}};
        shared->enqueue(std::move(c));
    }
    std::shared_ptr<Shared> shared;
    std::shared_ptr<Connection> conn;
};

class IbverbsBackend final : public Backend {
public:
    static Result<std::unique_ptr<Backend>> create(const BackendContext& ctx) {
        KVXFER_ASSIGN_OR_RETURN(const VerbsApi* verbs, loadVerbs());
        const IbverbsConfig& config = ctx.config->ibverbs;
        if (config.debug) g_debug.store(true);
        KVXFER_ASSIGN_OR_RETURN(DeviceSelector sel, selectorFrom(config));
        KVXFER_ASSIGN_OR_RETURN(std::shared_ptr<Device> device, Device::open(*verbs, sel));
        auto shared = std::make_shared<Shared>(*verbs, device, ctx, Tunables::from(config));
        KVXFER_RETURN_IF_ERROR(shared->init());
        return std::unique_ptr<Backend>(new IbverbsBackend(std::move(shared)));
    }

    ~IbverbsBackend() override {
        shared_->stop();
        if (thread_.get_id() == std::this_thread::get_id()) {
            thread_.detach();
        } else {
            thread_.join();
        }
    }

    std::string_view name() const override { return "ibverbs"; }
    const BackendCaps& caps() const override { return caps_; }

    std::string describe() const override {
        const Tunables& t = shared_->tunables();
        return "ibverbs (" + shared_->device().describe() + ", " + std::to_string(t.qps_per_peer) +
               " RC QPs/peer, SQ depth " + std::to_string(t.sq_depth) + ", max WR " +
               std::to_string(caps_.max_run_bytes) + " B, UD CM QPN 0x" + hex(shared_->udQpn()) + ")";
    }

    Bytes endpointInfo() const override {
        const Device& d = shared_->device();
        EndpointInfo e;
        e.link_layer = d.portAttr().link_layer;
        e.mtu = static_cast<uint8_t>(d.activeMtu());
        e.port = d.port();
        e.gid = d.gid();
        e.lid = d.portAttr().lid;
        e.ud_qpn = shared_->udQpn();
        e.qkey = shared_->qkey();
        return encodeEndpointInfo(e);
    }

    Result<std::unique_ptr<BackendRegion>> registerMemory(const MemorySpan& span) override {
        KVXFER_ASSIGN_OR_RETURN(auto mr, MemoryRegion::create(shared_->devicePtr(), span.base, span.length,
                                                              MemoryRegion::kRemoteAccess));
        return std::unique_ptr<BackendRegion>(new IbRegion(std::move(mr)));
    }

    Result<std::shared_ptr<BackendPeer>> connect(const PeerIdentity& identity, ByteView info,
                                                 Clock::time_point deadline) override {
        KVXFER_ASSIGN_OR_RETURN(EndpointInfo remote, decodeEndpointInfo(info));
        const Device& d = shared_->device();
        if (remote.link_layer != d.portAttr().link_layer) {
            return Status::unsupported(
                "ibverbs: peer '" + identity.name + "' is on " +
                (remote.link_layer == IBV_LINK_LAYER_ETHERNET ? "Ethernet (RoCE)" : "InfiniBand") +
                ", this engine's port is not");
        }
        if (shared_->deviceDead()) return shared_->deviceDeadStatus();
        if (shared_->portDown()) {
            return Status::peerUnreachable("ibverbs: port " + std::to_string(d.port()) + " of " + d.name() +
                                           " is down");
        }
        auto conn = std::make_shared<Connection>();
        conn->id = randomU64();
        conn->initiator = true;
        conn->peer_name = identity.name;
        conn->peer_instance = identity.instance_id;
        conn->remote = remote;
        conn->mtu = static_cast<ibv_mtu>(std::min<int>(remote.mtu, d.activeMtu()));
        conn->generation = 1;
        conn->slots.resize(shared_->tunables().qps_per_peer);
        for (size_t i = 0; i < conn->slots.size(); ++i) {
            conn->slots[i].index = static_cast<int>(i);
            KVXFER_ASSIGN_OR_RETURN(conn->slots[i].qp, shared_->newRcQp());
        }
        auto waiter = std::make_shared<Waiter>();
        shared_->enqueue({Command::Kind::kConnect, nullptr, conn, waiter, {}, deadline});
        if (!waiter->wait(deadline + 1s)) {  // the progress thread normally answers at `deadline`
            shared_->enqueue({Command::Kind::kAbortConnect, nullptr, conn, nullptr, {}, {}});
            return Status::peerUnreachable("ibverbs: connecting to peer '" + identity.name + "' timed out");
        }
        if (!waiter->status.isOk()) {
            shared_->enqueue({Command::Kind::kAbortConnect, nullptr, conn, nullptr, {}, {}});
            return waiter->status;
        }
        return std::shared_ptr<BackendPeer>(std::make_shared<IbPeer>(shared_, std::move(conn)));
    }

    Result<std::unique_ptr<BackendRemoteRegion>> importRemoteRegion(BackendPeer&,
                                                                    const RegionDescriptor& region,
                                                                    ByteView remote_key) override {
        auto key = decodeRemoteKey(remote_key);
        if (!key.isOk()) {
            return Status::badDescriptor("region " + std::to_string(region.id) + ": " +
                                         key.status().message());
        }
        return std::unique_ptr<BackendRemoteRegion>(new IbRemoteRegion(*key));
    }

    Status submit(const std::shared_ptr<TransferJob>& job) override {
        auto& peer = static_cast<IbPeer&>(*job->peer);
        if (shared_->deviceDead()) return shared_->deviceDeadStatus();
        if (peer.conn->dead.load(std::memory_order_acquire)) {
            Status why = peer.conn->deadStatus();
            return Status(why.code(),
                          why.message() + "; add the peer again (remove_peer + add_peer) to reconnect");
        }
        shared_->enqueue({Command::Kind::kSubmit, job, peer.conn, nullptr, {}, {}});
        return Status::ok();
    }

    void cancel(TransferJob&) override {
        shared_->enqueue({Command::Kind::kCancel, nullptr, nullptr, nullptr, {}, {}});
    }

    Status notify(BackendPeer& p, ByteView payload, Clock::time_point deadline) override {
        auto& peer = static_cast<IbPeer&>(p);
        if (payload.size() > kMaxNotifyPayload)
            return Status::invalidArgument("notification payload exceeds 64 KiB");
        if (shared_->deviceDead()) return shared_->deviceDeadStatus();
        if (peer.conn->dead.load(std::memory_order_acquire)) return peer.conn->deadStatus();
        auto waiter = std::make_shared<Waiter>();
        shared_->enqueue(
            {Command::Kind::kNotify, nullptr, peer.conn, waiter, Bytes(payload.begin(), payload.end()), {}});
        if (!waiter->wait(deadline)) {
            return Status::timeout("ibverbs: notification to peer '" + peer.conn->peer_name +
                                   "' was not acknowledged before its deadline (it may still arrive)");
        }
        return waiter->status;
    }

private:
    explicit IbverbsBackend(std::shared_ptr<Shared> shared) : shared_(std::move(shared)) {
        caps_.max_run_bytes = std::min<uint64_t>(shared_->maxMessage(), shared_->tunables().max_wr_bytes);
        thread_ = std::thread([s = shared_] { s->run(); });
    }

    std::shared_ptr<Shared> shared_;
    BackendCaps caps_{};
    std::thread thread_;
};

}  // namespace
}  // namespace ib

Status ibverbsAvailability() {
    auto verbs = ib::loadVerbs();
    if (!verbs.isOk()) return verbs.status();
    return ib::probeDevices(**verbs);
}

Result<std::unique_ptr<Backend>> createIbverbsBackend(const BackendContext& context) {
    return ib::IbverbsBackend::create(context);
}

}  // namespace kvxfer
