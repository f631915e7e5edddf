// Loopback: the reference backend. Engines in one process reach each other's memory
// directly (memcpy on a CopyPool); notifications go straight into the target engine's
// sink. Always built; drives the conformance suite and framework unit tests.
#include <unistd.h>

#include <cstring>
#include <map>
#include <mutex>

#include "backends/factories.h"
#include "util/copy_pool.h"
#include "util/fast_copy.h"

namespace kvxfer {
namespace {

// Process-wide directory of live loopback endpoints, keyed by engine instance id.
struct Endpoint {
    std::mutex mutex;
    NotificationSink* sink = nullptr;  // null once the backend is gone
    std::string name;
    uint64_t instance = 0;
};

std::mutex g_directory_mutex;
std::map<uint64_t, std::weak_ptr<Endpoint>>& directory() {
    static auto* d = new std::map<uint64_t, std::weak_ptr<Endpoint>>();
    return *d;
}

struct LoopbackPeer : BackendPeer {
    std::shared_ptr<Endpoint> target;
    std::shared_ptr<Endpoint> self;
};

Status deliverTo(const LoopbackPeer& peer, ByteView payload) {
    std::lock_guard<std::mutex> lock(peer.target->mutex);
    if (peer.target->sink == nullptr) {
        return Status::peerUnreachable("loopback peer '" + peer.target->name + "' is closed");
    }
    peer.target->sink->deliver(peer.self->name, peer.self->instance, Bytes(payload.begin(), payload.end()));
    return Status::ok();
}

Status copyRuns(TransferJob& job, uint64_t first, uint64_t end) {
    const auto& peer = static_cast<const LoopbackPeer&>(*job.peer);
    {
        std::lock_guard<std::mutex> lock(peer.target->mutex);
        if (peer.target->sink == nullptr) {
            return Status::peerUnreachable("loopback peer '" + peer.target->name + "' is closed");
        }
    }
    auto* remote = reinterpret_cast<uint8_t*>(job.remote.base_address);
    for (uint64_t i = first; i < end; ++i) {
        const Run r = job.plan->flatRun(i);
        if (job.op == Op::kWrite) {
            copyRun(remote + r.remote_offset, job.local.base + r.local_offset, r.length);
        } else {
            copyRun(job.local.base + r.local_offset, remote + r.remote_offset, r.length);
        }
    }
    copyFence();
    return Status::ok();
}

class LoopbackBackend final : public Backend {
public:
    explicit LoopbackBackend(const BackendContext& ctx)
        : endpoint_(std::make_shared<Endpoint>()),
          pool_(ctx.threads ? ctx.threads : 1, 1024, 8 << 20, copyRuns, [](TransferJob& job) {
              return deliverTo(static_cast<LoopbackPeer&>(*job.peer), job.notify);
          }) {
        endpoint_->sink = ctx.sink;
        endpoint_->name = ctx.engine_name;
        endpoint_->instance = ctx.instance_id;
        std::lock_guard<std::mutex> lock(g_directory_mutex);
        directory()[ctx.instance_id] = endpoint_;
    }
    ~LoopbackBackend() override {
        {
            std::lock_guard<std::mutex> lock(g_directory_mutex);
            directory().erase(endpoint_->instance);
        }
        std::lock_guard<std::mutex> lock(endpoint_->mutex);
        endpoint_->sink = nullptr;
    }

    std::string_view name() const override { return "loopback"; }
    const BackendCaps& caps() const override { return caps_; }
    Bytes endpointInfo() const override { return {}; }
    std::string describe() const override {
        return "loopback (in-process memcpy, " + std::to_string(pool_.threads()) + " threads)";
    }

    Result<std::unique_ptr<BackendRegion>> registerMemory(uint8_t*, uint64_t) override {
        return std::make_unique<BackendRegion>();
    }

    Result<std::shared_ptr<BackendPeer>> connect(const PeerIdentity& peer, ByteView,
                                                 Clock::time_point) override {
        if (peer.pid != static_cast<uint32_t>(::getpid())) {
            return Status::unsupported("loopback reaches engines of this process only");
        }
        std::lock_guard<std::mutex> lock(g_directory_mutex);
        auto it = directory().find(peer.instance_id);
        auto target = it == directory().end() ? nullptr : it->second.lock();
        if (!target) return Status::peerUnreachable("loopback peer '" + peer.name + "' is not running");
        auto conn = std::make_shared<LoopbackPeer>();
        conn->target = std::move(target);
        conn->self = endpoint_;
        return std::shared_ptr<BackendPeer>(std::move(conn));
    }

    Result<std::unique_ptr<BackendRemoteRegion>> importRemoteRegion(BackendPeer&, const RegionDescriptor&,
                                                                    ByteView) override {
        return std::make_unique<BackendRemoteRegion>();
    }

    Status submit(const std::shared_ptr<TransferJob>& job) override {
        pool_.submit(job);
        return Status::ok();
    }

    Status notify(BackendPeer& peer, ByteView payload, Clock::time_point) override {
        return deliverTo(static_cast<LoopbackPeer&>(peer), payload);
    }

private:
    BackendCaps caps_{.same_process_only = true, .same_host_only = true, .max_run_bytes = 4 << 20};
    std::shared_ptr<Endpoint> endpoint_;
    CopyPool pool_;
};

}  // namespace

Result<std::unique_ptr<Backend>> createLoopbackBackend(const BackendContext& context) {
    return std::unique_ptr<Backend>(new LoopbackBackend(context));
}

}  // namespace kvxfer
