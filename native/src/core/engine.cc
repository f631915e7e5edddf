#include "kvxfer/engine.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <random>
#include <sstream>

namespace kvxfer {
namespace {

// Processes that can reach each other's memory directly share a boot and a pid namespace.
std::string readHostId() {
    std::string boot;
    std::ifstream f("/proc/sys/kernel/random/boot_id");
    std::getline(f, boot);
    struct stat st {};
    const unsigned long long ns = ::stat("/proc/self/ns/pid", &st) == 0 ? st.st_ino : 0;
    return boot + "/" + std::to_string(ns);
}

uint64_t randomInstanceId() {
    std::random_device rd;
    uint64_t v = 0;
    while (v == 0) v = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    return v;
}

Clock::time_point deadlineAfter(std::chrono::milliseconds timeout) { return Clock::now() + timeout; }

}  // namespace

Region::~Region() {
    if (engine_) {
        std::lock_guard<std::mutex> lock(engine_->control_mutex_);
        engine_->regions_.erase(id_);
        engine_->published_.erase(id_);
    }
    // backend_regions_ (MRs...) go now: no job can reference this Region any more.
}

Peer::~Peer() = default;

std::shared_ptr<const PeerDescriptor> Peer::descriptor() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return descriptor_;
}

bool Peer::removed() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return removed_;
}

Engine::Engine(EngineConfig config) : config_(std::move(config)) {}

Engine::~Engine() {
    close();
    // Backends go first: their threads may deliver notifications into members below.
    backends_.clear();
}

Result<std::shared_ptr<Engine>> Engine::create(const EngineConfig& config) {
    if (config.name.empty() || config.name.size() > PeerDescriptor::kMaxName) {
        return Status::invalidArgument("engine name must be 1.." + std::to_string(PeerDescriptor::kMaxName) +
                                       " characters");
    }
    std::shared_ptr<Engine> engine(new Engine(config));
    engine->instance_id_ = randomInstanceId();
    engine->host_id_ = readHostId();

    std::vector<std::string> names = config.backends;
    if (names.empty()) {
        for (const auto& info : listBackends()) {
            if (info.available && info.on_by_default) names.push_back(info.name);
        }
    }
    BackendContext ctx;
    ctx.engine_name = config.name;
    ctx.instance_id = engine->instance_id_;
    ctx.sink = engine.get();
    ctx.threads = config.threads;
    ctx.device = config.device;
    for (const auto& name : names) {
        if (std::any_of(engine->backends_.begin(), engine->backends_.end(),
                        [&](const auto& b) { return b->name() == name; })) {
            return Status::invalidArgument("backend '" + name + "' listed twice");
        }
        KVXFER_ASSIGN_OR_RETURN(auto backend, createBackend(name, ctx));
        engine->backends_.push_back(std::move(backend));
    }
    if (engine->backends_.empty()) return Status::unsupported("no backend is available");
    return engine;
}

std::vector<std::string> Engine::backendNames() const {
    std::vector<std::string> out;
    for (const auto& b : backends_) out.emplace_back(b->name());
    return out;
}

std::string Engine::describeBackends() const {
    std::ostringstream os;
    for (size_t i = 0; i < backends_.size(); ++i) os << (i ? "; " : "") << backends_[i]->describe();
    return os.str();
}

Result<std::shared_ptr<Region>> Engine::registerMemory(void* base, uint64_t length,
                                                       std::optional<KvLayout> layout,
                                                       std::shared_ptr<void> owner) {
    if (base == nullptr || length == 0) {
        return Status::invalidArgument("cannot register an empty or null buffer");
    }
    if (reinterpret_cast<uintptr_t>(base) + length < reinterpret_cast<uintptr_t>(base)) {
        return Status::invalidArgument("buffer range wraps around the address space");
    }
    if (layout) {
        *layout = layout->normalized();
        KVXFER_RETURN_IF_ERROR(layout->validate(length));
    }
    std::lock_guard<std::mutex> lock(control_mutex_);
    if (closed_) return Status::canceled("engine is closed");
    std::shared_ptr<Region> region(new Region());
    region->engine_ = shared_from_this();
    region->id_ = next_region_id_++;
    region->base_ = static_cast<uint8_t*>(base);
    region->length_ = length;
    region->layout_ = layout;
    region->owner_ = std::move(owner);
    RegionDescriptor published;
    published.id = region->id_;
    published.base_address = reinterpret_cast<uint64_t>(base);
    published.length = length;
    published.layout = layout;
    for (auto& backend : backends_) {
        auto reg = backend->registerMemory(region->base_, length);
        if (!reg.isOk()) {
            region->engine_.reset();  // not yet in regions_: skip the destructor's erase
            return reg.status();
        }
        published.remote_keys.push_back((*reg)->remoteKey());
        region->backend_regions_.push_back(std::move(reg).value());
    }
    regions_[region->id_] = region;
    published_[region->id_] = std::move(published);
    return region;
}

Status Engine::deregisterMemory(const Region& region) {
    std::lock_guard<std::mutex> lock(control_mutex_);
    if (region.engine_.get() != this || published_.erase(region.id_) == 0) {
        return Status::notFound("region " + std::to_string(region.id_) + " is not registered here");
    }
    return Status::ok();
}

Bytes Engine::descriptor() const {
    PeerDescriptor d;
    d.engine_name = config_.name;
    d.instance_id = instance_id_;
    d.host_id = host_id_;
    d.pid = static_cast<uint32_t>(::getpid());
    for (const auto& b : backends_) d.backends.push_back({std::string(b->name()), b->endpointInfo()});
    std::lock_guard<std::mutex> lock(control_mutex_);
    for (const auto& [id, r] : published_) d.regions.push_back(r);
    return encodeDescriptor(d);
}

Result<std::shared_ptr<Peer>> Engine::addPeer(ByteView bytes) {
    KVXFER_ASSIGN_OR_RETURN(PeerDescriptor desc, decodeDescriptor(bytes));
    std::lock_guard<std::mutex> lock(control_mutex_);
    if (closed_) return Status::canceled("engine is closed");
    if (desc.instance_id == instance_id_) {
        return Status::invalidArgument("descriptor is this engine's own");
    }
    const auto deadline = deadlineAfter(config_.connect_timeout);

    std::shared_ptr<Peer> existing;
    if (auto it = peers_.find(desc.engine_name); it != peers_.end()) existing = it->second;

    std::shared_ptr<Peer> peer;
    if (existing && existing->instanceId() == desc.instance_id) {
        peer = existing;  // refresh: import regions it did not have
    } else {
        peer.reset(new Peer());
        peer->engine_ = shared_from_this();
        peer->name_ = desc.engine_name;
        peer->instance_id_ = desc.instance_id;
        PeerIdentity identity{desc.engine_name, desc.instance_id, desc.pid, desc.host_id == host_id_};
        Status last = Status::unsupported("no common backend with peer '" + desc.engine_name + "'");
        for (size_t i = 0; i < backends_.size() && !peer->connection_; ++i) {
            for (const auto& ep : desc.backends) {
                if (ep.name != backends_[i]->name()) continue;
                const BackendCaps& caps = backends_[i]->caps();
                if (caps.same_host_only && !identity.same_host) break;
                if (caps.same_process_only &&
                    (!identity.same_host || desc.pid != static_cast<uint32_t>(::getpid())))
                    break;
                auto conn = backends_[i]->connect(identity, ep.info, deadline);
                if (conn.isOk()) {
                    peer->connection_ = std::move(conn).value();
                    peer->backend_index_ = i;
                    peer->backend_name_ = std::string(backends_[i]->name());
                } else {
                    last = conn.status();
                }
                break;
            }
        }
        if (!peer->connection_) return last;
    }

    // Import every region of the new descriptor that is not imported yet.
    size_t key_index = 0;
    for (; key_index < desc.backends.size(); ++key_index) {
        if (desc.backends[key_index].name == peer->backend_name_) break;
    }
    if (key_index == desc.backends.size()) {
        return Status::badDescriptor("peer '" + desc.engine_name + "' no longer offers backend " +
                                     peer->backend_name_);
    }
    Backend& backend = *backends_[peer->backend_index_];
    for (const auto& region : desc.regions) {
        {
            std::lock_guard<std::mutex> plock(peer->mutex_);
            if (peer->imports_.count(region.id)) continue;
        }
        KVXFER_ASSIGN_OR_RETURN(auto import, backend.importRemoteRegion(*peer->connection_, region,
                                                                        region.remote_keys[key_index]));
        std::lock_guard<std::mutex> plock(peer->mutex_);
        peer->imports_[region.id] = std::move(import);
    }
    {
        std::lock_guard<std::mutex> plock(peer->mutex_);
        peer->descriptor_ = std::make_shared<const PeerDescriptor>(std::move(desc));
    }
    if (existing && existing != peer) {
        std::vector<std::weak_ptr<TransferJob>> jobs;
        {
            std::lock_guard<std::mutex> plock(existing->mutex_);
            existing->removed_ = true;
            jobs.swap(existing->in_flight_);
        }
        for (auto& w : jobs) {
            if (auto job = w.lock())
                job->abandon(Status::peerUnreachable("peer '" + existing->name() + "' restarted"));
        }
    }
    peers_[peer->name()] = peer;
    return peer;
}

Status Engine::removePeer(const std::string& name) {
    std::shared_ptr<Peer> peer;
    {
        std::lock_guard<std::mutex> lock(control_mutex_);
        auto it = peers_.find(name);
        if (it == peers_.end()) return Status::notFound("unknown peer '" + name + "'");
        peer = it->second;
        peers_.erase(it);
    }
    std::vector<std::weak_ptr<TransferJob>> jobs;
    {
        std::lock_guard<std::mutex> plock(peer->mutex_);
        peer->removed_ = true;
        jobs.swap(peer->in_flight_);
    }
    for (auto& w : jobs) {
        if (auto job = w.lock()) job->abandon(Status::canceled("peer '" + name + "' was removed"));
    }
    return Status::ok();
}

std::shared_ptr<Peer> Engine::findPeer(const std::string& name) const {
    std::lock_guard<std::mutex> lock(control_mutex_);
    auto it = peers_.find(name);
    return it == peers_.end() ? nullptr : it->second;
}

Result<std::shared_ptr<const Plan>> Engine::planFor(const TransferRequest& req,
                                                    RemoteRegionView* remote_out) const {
    if (!req.peer) return Status::invalidArgument("no peer given");
    if (!req.local) return Status::invalidArgument("no local region given");
    if (req.peer->engine_.get() != this) return Status::invalidArgument("peer belongs to another engine");
    if (req.local->engine_.get() != this) {
        return Status::notFound("local region " + std::to_string(req.local->id()) +
                                " is not registered with this engine");
    }
    if (req.peer->removed()) return Status::notFound("peer '" + req.peer->name() + "' was removed");
    const auto snapshot = req.peer->descriptor();
    const RegionDescriptor* remote = nullptr;
    for (const auto& r : snapshot->regions) {
        if (r.id == req.remote_region) remote = &r;
    }
    if (remote == nullptr) {
        return Status::notFound("peer '" + req.peer->name() + "' has no region " +
                                std::to_string(req.remote_region));
    }
    TransferSide local_side = req.local_side;
    TransferSide remote_side = req.remote_side;
    if (auto* b = std::get_if<BlockSide>(&local_side)) {
        if (!req.local->layout()) {
            return Status::invalidArgument("local region " + std::to_string(req.local->id()) +
                                           " was registered without a KV layout; use extents");
        }
        b->layout = *req.local->layout();
    }
    if (auto* b = std::get_if<BlockSide>(&remote_side)) {
        if (!remote->layout) {
            return Status::invalidArgument("remote region " + std::to_string(remote->id) + " of peer '" +
                                           req.peer->name() + "' has no KV layout; use extents");
        }
        b->layout = *remote->layout;
    }
    PlanOptions options;
    options.coalesce = req.coalesce;
    options.max_run_bytes = backends_[req.peer->backend_index_]->caps().max_run_bytes;
    KVXFER_ASSIGN_OR_RETURN(Plan plan,
                            makePlan(local_side, req.local->length(), remote_side, remote->length, options));
    if (remote_out) *remote_out = {remote->id, remote->base_address, remote->length, nullptr};
    return std::make_shared<const Plan>(std::move(plan));
}

Result<std::shared_ptr<const Plan>> Engine::plan(const TransferRequest& request) const {
    return planFor(request, nullptr);
}

Result<std::shared_ptr<TransferJob>> Engine::post(const TransferRequest& req) {
    if (closed()) return Status::canceled("engine is closed");
    RemoteRegionView remote;
    KVXFER_ASSIGN_OR_RETURN(auto plan, planFor(req, &remote));
    if (req.notify.size() > PeerDescriptor::kMaxBlob) {
        return Status::invalidArgument("notification payload is larger than 64 KiB");
    }
    Peer& peer = *req.peer;
    auto job = std::make_shared<TransferJob>();
    job->id = next_transfer_id_.fetch_add(1, std::memory_order_relaxed);
    job->op = req.op;
    job->local = {req.local->id(), req.local->base(), req.local->length(),
                  req.local->backendRegion(peer.backend_index_)};
    job->peer = peer.connection_.get();
    job->notify = req.notify;
    job->deadline = deadlineAfter(req.timeout.count() > 0 ? req.timeout : config_.default_timeout);
    job->keepalive =
        std::make_shared<std::pair<std::shared_ptr<Region>, std::shared_ptr<Peer>>>(req.local, req.peer);
    const uint64_t bytes = plan->total_bytes;
    const uint64_t runs = plan->numRuns();
    job->plan = std::move(plan);
    job->on_terminal = [this, bytes](bool done) {
        std::lock_guard<std::mutex> lock(stats_mutex_);
        if (done) {
            ++stats_.transfers_done;
            stats_.bytes_done += bytes;
        } else {
            ++stats_.transfers_failed;
        }
    };
    {
        std::lock_guard<std::mutex> plock(peer.mutex_);
        if (peer.removed_) return Status::notFound("peer '" + peer.name() + "' was removed");
        auto import = peer.imports_.find(remote.id);
        if (import == peer.imports_.end()) return Status::internal("remote region not imported");
        job->remote = {remote.id, remote.base_address, remote.length, import->second.get()};
        if (peer.in_flight_.size() >= 64 && (peer.in_flight_.size() & 63) == 0) {
            std::erase_if(peer.in_flight_, [](const auto& w) { return w.expired(); });
        }
        peer.in_flight_.push_back(job);
    }
    {
        std::lock_guard<std::mutex> lock(stats_mutex_);
        ++stats_.transfers_posted;
        stats_.runs_posted += runs;
    }
    Status st = backends_[peer.backend_index_]->submit(job);
    if (!st.isOk()) {
        job->finish(st);
        return st;
    }
    return job;
}

Status Engine::notify(Peer& peer, ByteView payload, std::chrono::milliseconds timeout) {
    if (peer.engine_.get() != this) return Status::invalidArgument("peer belongs to another engine");
    if (peer.removed()) return Status::notFound("peer '" + peer.name() + "' was removed");
    if (payload.size() > PeerDescriptor::kMaxBlob) {
        return Status::invalidArgument("notification payload is larger than 64 KiB");
    }
    return backends_[peer.backend_index_]->notify(
        *peer.connection_, payload, deadlineAfter(timeout.count() > 0 ? timeout : config_.default_timeout));
}

void Engine::deliver(std::string peer_name, uint64_t peer_instance, Bytes payload) {
    {
        std::lock_guard<std::mutex> lock(notify_mutex_);
        notifications_.push_back({std::move(peer_name), peer_instance, std::move(payload)});
    }
    {
        std::lock_guard<std::mutex> lock(stats_mutex_);
        ++stats_.notifications_received;
    }
    notify_cv_.notify_all();
}

std::vector<Notification> Engine::takeNotifications(size_t max) {
    std::lock_guard<std::mutex> lock(notify_mutex_);
    const size_t n = max == 0 ? notifications_.size() : std::min(max, notifications_.size());
    std::vector<Notification> out(std::make_move_iterator(notifications_.begin()),
                                  std::make_move_iterator(notifications_.begin() + n));
    notifications_.erase(notifications_.begin(), notifications_.begin() + n);
    return out;
}

bool Engine::waitNotification(Clock::time_point until) {
    std::unique_lock<std::mutex> lock(notify_mutex_);
    return notify_cv_.wait_until(lock, until, [&] { return !notifications_.empty(); });
}

EngineStats Engine::stats() const {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    return stats_;
}

bool Engine::closed() const {
    std::lock_guard<std::mutex> lock(control_mutex_);
    return closed_;
}

void Engine::close() {
    std::map<std::string, std::shared_ptr<Peer>> peers;
    {
        std::lock_guard<std::mutex> lock(control_mutex_);
        if (closed_) return;
        closed_ = true;
        peers.swap(peers_);
    }
    for (auto& [name, peer] : peers) {
        std::vector<std::weak_ptr<TransferJob>> jobs;
        {
            std::lock_guard<std::mutex> plock(peer->mutex_);
            peer->removed_ = true;
            jobs.swap(peer->in_flight_);
        }
        for (auto& w : jobs) {
            if (auto job = w.lock()) job->abandon(Status::canceled("engine closed"));
        }
    }
}

}  // namespace kvxfer
