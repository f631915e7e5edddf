// ibverbs backend: one-sided RDMA WRITE / READ over RC queue pairs, connections set up
// by a tiny connection manager over a UD queue pair (no socket side channel), and
// notifications as RC SENDs received into a shared receive queue. README.md in this
// directory has the design, the wire formats and the tunables.
//
// Threads: the control plane (registerMemory, connect, importRemoteRegion) runs on the
// caller's thread; submit() and notify() only queue a command and wake the progress
// thread. The progress thread owns every connection, queue pair window and job state:
// it posts work requests, polls the one completion queue, answers connection requests,
// delivers notifications and applies deadlines. It is a thread of the engine's ThreadGroup
// (Engine::close() joins it) and captures only `Shared`, never the backend object.
//
// This file is the Backend subclass; the rest is spread over the files README.md maps.
#include <deque>
#include <random>
#include <thread>
#include <unordered_set>

#include "backends/factories.h"
#include "backends/ibverbs/shared.h"
#include "util/thread_group.h"

namespace kvxfer {
namespace ib {
namespace {

uint64_t randomU64() {
    static thread_local std::mt19937_64 rng{(static_cast<uint64_t>(std::random_device{}()) << 32) ^
                                            std::random_device{}()};
    uint64_t v = 0;
    while (v == 0) v = rng();
    return v;
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
        return std::unique_ptr<Backend>(new IbverbsBackend(*ctx.threads, std::move(shared)));
    }

    ~IbverbsBackend() override { shutdown(); }

    // The progress thread tells its peers, tears the connections down (their QPs flushed,
    // so the NIC touches no job memory any more), ends every job and returns.
    void shutdown() override { shared_->stop(); }

    std::string_view name() const override { return "ibverbs"; }
    const BackendCaps& caps() const override { return caps_; }

    std::string describe() const override {
        const Tunables& t = shared_->tunables();
        return "ibverbs (" + shared_->device().describe() + ", " + std::to_string(t.qps_per_peer) +
               " RC QPs/peer, SQ depth " + std::to_string(t.sq_depth) + ", max WR " +
               std::to_string(caps_.max_run_bytes) + " B, UD CM QPN 0x" + hex(shared_->udQpn()) +
               ", GPU memory: " + gpu_memory_ + ")";
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
        // CUDA memory (offered only when gpuDirectAvailability said yes): the NIC reads and
        // writes it directly; nothing in this backend touches a region's bytes with the CPU
        // (RDMA WRs never use IBV_SEND_INLINE; only notification SENDs from host slabs do).
        const bool gpu = span.kind == MemoryKind::kCuda;
        auto reg = [&](int access) {
            return gpu ? MemoryRegion::createGpu(shared_->devicePtr(), span.base, span.length, access,
                                                 span.device)
                       : MemoryRegion::create(shared_->devicePtr(), span.base, span.length, access);
        };
        KVXFER_ASSIGN_OR_RETURN(auto local, reg(IBV_ACCESS_LOCAL_WRITE));
        // The published rkey is never one this engine revoked recently: a stale descriptor
        // (region deregistered, memory registered again) then reaches nothing, even where
        // the provider would hand the same key out again.
        std::vector<std::unique_ptr<MemoryRegion>> colliding;
        for (;;) {
            KVXFER_ASSIGN_OR_RETURN(auto remote, reg(MemoryRegion::kRemoteAccess));
            {
                std::lock_guard<std::mutex> lock(keys_mutex_);
                if (!retired_rkeys_.contains(remote->rkey()))
                    return std::unique_ptr<BackendRegion>(new IbRegion(std::move(local), std::move(remote)));
            }
            if (colliding.size() >= 8) {
                return Status::system("ibverbs: the device keeps handing out remote keys of revoked regions");
            }
            colliding.push_back(std::move(remote));  // held until a fresh key is found
        }
    }

    void revokeMemory(BackendRegion& region) override {
        auto& r = static_cast<IbRegion&>(region);
        r.revoke();
        std::lock_guard<std::mutex> lock(keys_mutex_);
        if (retired_rkeys_.insert(r.rkey()).second) retired_order_.push_back(r.rkey());
        while (retired_order_.size() > kMaxRetiredKeys) {
            retired_rkeys_.erase(retired_order_.front());
            retired_order_.pop_front();
        }
    }

    Result<std::shared_ptr<BackendPeer>> connect(const PeerIdentity& identity, ByteView info,
                                                 Clock::time_point deadline) override {
        KVXFER_ASSIGN_OR_RETURN(EndpointInfo remote, decodeEndpointInfo(info));
        if (identity.secret.size() != PeerDescriptor::kSecretBytes) {
            return Status::badDescriptor("ibverbs peer '" + identity.name +
                                         "' published no connection secret (a kvxfer older than the "
                                         "authenticated connection manager)");
        }
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
        conn->peer_secret = identity.secret;
        conn->remote = remote;
        conn->mtu = static_cast<ibv_mtu>(std::min<int>(remote.mtu, d.activeMtu()));
        conn->generation = 1;
        conn->slots.resize(shared_->tunables().qps_per_peer);
        for (size_t i = 0; i < conn->slots.size(); ++i) {
            conn->slots[i].index = static_cast<int>(i);
            KVXFER_ASSIGN_OR_RETURN(conn->slots[i].qp, shared_->newRcQp());
        }
        auto waiter = std::make_shared<Waiter>();
        if (!shared_->enqueue({Command::Kind::kConnect, nullptr, conn, waiter, {}, deadline})) {
            return Status::canceled("ibverbs: the backend is closing");
        }
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
            // kPeerUnreachable with nothing started: the core reconnects and posts again.
            Status why = peer.conn->deadStatus();
            return Status::peerUnreachable(why.message());
        }
        if (!shared_->enqueue({Command::Kind::kSubmit, job, peer.conn, nullptr, {}, {}})) {
            return Status::canceled("ibverbs: the backend is closing");
        }
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
        if (!shared_->enqueue({Command::Kind::kNotify,
                               nullptr,
                               peer.conn,
                               waiter,
                               Bytes(payload.begin(), payload.end()),
                               {}})) {
            return Status::canceled("ibverbs: the backend is closing");
        }
        if (!waiter->wait(deadline)) {
            return Status::timeout("ibverbs: notification to peer '" + peer.conn->peer_name +
                                   "' was not acknowledged before its deadline (it may still arrive)");
        }
        return waiter->status;
    }

private:
    IbverbsBackend(ThreadGroup& threads, std::shared_ptr<Shared> shared) : shared_(std::move(shared)) {
        caps_.max_run_bytes = std::min<uint64_t>(shared_->maxMessage(), shared_->tunables().max_wr_bytes);
        caps_.lanes = shared_->tunables().qps_per_peer;  // RC QPs per peer
        // GPUDirect RDMA: CUDA regions are offered to this backend only where registering
        // them can work at all (a peer must offer them too for its CUDA regions to be reached).
        const Status gpu = gpuDirectAvailability(shared_->device().verbs());
        if (gpu.isOk()) caps_.memory_kinds |= memoryKindBit(MemoryKind::kCuda);
        gpu_memory_ = gpu.isOk() ? "GPUDirect (dma-buf, else peer memory)" : "no (" + gpu.message() + ")";
        threads.spawn([s = shared_] { s->run(); });  // at engine creation: the group is open
    }

    static constexpr size_t kMaxRetiredKeys = 65536;

    std::shared_ptr<Shared> shared_;
    BackendCaps caps_{};
    std::string gpu_memory_;  // for describe()
    std::mutex keys_mutex_;
    std::unordered_set<uint32_t> retired_rkeys_;  // rkeys of revoked regions, newest kMaxRetiredKeys
    std::deque<uint32_t> retired_order_;
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
