// Loopback: the reference backend. Engines in one process reach each other's memory
// directly (memcpy on a CopyPool); notifications go straight into the target engine's
// sink. Always built; drives the conformance suite and framework unit tests.
#include <unistd.h>

#include <cstring>
#include <map>
#include <mutex>

#include "backends/factories.h"
#include "backends/loopback/in_process_copy.h"
#include "kvxfer/config.h"
#include "util/copy_pool.h"

namespace kvxfer {
namespace {

// The inline path (LoopbackConfig::inline_max_bytes, 64 KiB by default: below it a copy on
// the posting thread costs less than a hand-off to a copy thread; docs/benchmarks.md,
// Latency) takes jobs of at most this many runs.
constexpr uint64_t kInlineMaxRuns = 64;

// Process-wide directory of live loopback endpoints, keyed by engine instance id.
struct Endpoint {
    std::mutex mutex;
    NotificationSink* sink = nullptr;  // null once the backend is gone
    std::string name;
    uint64_t instance = 0;
    // This engine's registrations, by (base, length): what a peer's import pins.
    std::multimap<std::pair<uint64_t, uint64_t>, std::weak_ptr<RegionPin>> pins;
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
    return peer.target->sink->deliver(peer.self->name, peer.self->instance,
                                      Bytes(payload.begin(), payload.end()));
}

Status copyRuns(TransferJob& job, uint64_t first, uint64_t end) {
    const auto& peer = static_cast<const LoopbackPeer&>(*job.peer);
    {
        std::lock_guard<std::mutex> lock(peer.target->mutex);
        if (peer.target->sink == nullptr) {
            return Status::peerUnreachable("loopback peer '" + peer.target->name + "' is closed");
        }
    }
    return copyInProcess(job, first, end);
}

class LoopbackBackend final : public Backend {
public:
    explicit LoopbackBackend(const BackendContext& ctx)
        : endpoint_(std::make_shared<Endpoint>()),
          pool_(*ctx.threads, std::max(1u, ctx.config->loopback.threads), 1024, 8 << 20, copyRuns,
                [](const std::shared_ptr<TransferJob>& job) -> std::optional<Status> {
                    return deliverTo(static_cast<LoopbackPeer&>(*job->peer), job->notify);
                }) {
        caps_.lanes = pool_.threads();
        caps_.inline_max_bytes = ctx.config->loopback.inline_max_bytes;
        endpoint_->sink = ctx.sink;
        endpoint_->name = ctx.engine_name;
        endpoint_->instance = ctx.instance_id;
        std::lock_guard<std::mutex> lock(g_directory_mutex);
        directory()[ctx.instance_id] = endpoint_;
    }
    ~LoopbackBackend() override { shutdown(); }

    // Peers reach this engine no more; the workers end what is queued and return.
    void shutdown() override {
        {
            std::lock_guard<std::mutex> lock(g_directory_mutex);
            auto it = directory().find(endpoint_->instance);
            if (it != directory().end() && it->second.lock() == endpoint_) directory().erase(it);
        }
        {
            std::lock_guard<std::mutex> lock(endpoint_->mutex);
            endpoint_->sink = nullptr;
        }
        pool_.stop();
    }

    std::string_view name() const override { return "loopback"; }
    const BackendCaps& caps() const override { return caps_; }
    Bytes endpointInfo() const override { return {}; }
    std::string describe() const override {
        return "loopback (in-process memcpy, " + std::to_string(pool_.threads()) + " threads)";
    }

    Result<std::unique_ptr<BackendRegion>> registerMemory(const MemorySpan& span) override {
        auto region = std::make_unique<InProcessRegion>();
        std::lock_guard<std::mutex> lock(endpoint_->mutex);
        auto& pins = endpoint_->pins;
        for (auto it = pins.begin(); it != pins.end();)
            it = it->second.expired() ? pins.erase(it) : std::next(it);
        pins.emplace(std::make_pair(reinterpret_cast<uint64_t>(span.base), span.length), region->pin);
        return std::unique_ptr<BackendRegion>(std::move(region));
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

    Result<std::unique_ptr<BackendRemoteRegion>> importRemoteRegion(BackendPeer& backend_peer,
                                                                    const RegionDescriptor& region,
                                                                    ByteView) override {
        auto& peer = static_cast<LoopbackPeer&>(backend_peer);
        auto remote = std::make_unique<InProcessRemoteRegion>();
        std::lock_guard<std::mutex> lock(peer.target->mutex);
        auto range = peer.target->pins.equal_range({region.base_address, region.length});
        for (auto it = range.first; it != range.second && !remote->pin; ++it) remote->pin = it->second.lock();
        return std::unique_ptr<BackendRemoteRegion>(std::move(remote));
    }

    Status submit(const std::shared_ptr<TransferJob>& job) override { return pool_.submit(job); }

    // Small jobs are copied on the posting thread (caps().inline_max_bytes); the
    // notification goes straight into the target's sink, as a copy worker would do it.
    Result<bool> trySubmitInline(const std::shared_ptr<TransferJob>& job) override {
        if (job->num_runs > kInlineMaxRuns) return false;
        // No abandonment check first: a job just posted has not been seen by anyone;
        // the job machine checks its deadline and cancellation after the copy.
        const Status st = copyRuns(*job, 0, job->num_runs);
        if (job->dataDone(st, true) == TransferJob::AfterData::kSendNotification) {
            job->finish(deliverTo(static_cast<LoopbackPeer&>(*job->peer), job->notify));
        }
        return true;
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
