#include "kvxfer/engine.h"

#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <random>

#include "core/deadline_timer.h"
#include "cuda/driver.h"
#include "util/auth.h"
#include "util/proc_file.h"
#include "util/thread_group.h"

namespace kvxfer {
namespace {

// Processes that can reach each other's memory directly share a boot and a pid namespace.
std::string readHostId() {
    const std::string boot(
        procfs::field(procfs::readFile("/proc/sys/kernel/random/boot_id").value_or(""), 0));
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

// Saturates instead of overflowing: a timeout of years is "no deadline in practice".
Clock::time_point deadlineAfter(std::chrono::milliseconds timeout, Clock::time_point now = Clock::now()) {
    const auto room = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::time_point::max() - now);
    return timeout >= room ? Clock::time_point::max() : now + timeout;
}

bool sameSide(const TransferSide& a, const TransferSide& b) {
    if (a.index() != b.index()) return false;
    if (const auto* x = std::get_if<BlockSide>(&a)) {
        const auto& y = std::get<BlockSide>(b);
        return x->block_ids.data() == y.block_ids.data() && x->block_ids.size() == y.block_ids.size() &&
               x->layer_begin == y.layer_begin && x->layer_end == y.layer_end;
    }
    const auto& x = std::get<ExtentSide>(a);
    const auto& y = std::get<ExtentSide>(b);
    return x.extents.data() == y.extents.data() && x.extents.size() == y.extents.size();
}

// Transfers in flight to one peer (posted, not yet let go of by the backend): beyond it a
// post fails with kBackPressure instead of queueing without bound behind a slow peer.
constexpr size_t kMaxInFlightPerPeer = 65536;

// Overlapping destination extents would make the result depend on the order the backend's
// threads happen to copy in: refused.
Status checkDestinationExtents(const TransferSide& side, const std::string& where) {
    const auto* x = std::get_if<ExtentSide>(&side);
    if (x == nullptr || x->extents.size() < 2) return Status::ok();
    std::vector<std::pair<uint64_t, uint64_t>> spans;
    spans.reserve(x->extents.size());
    for (const auto& e : x->extents) spans.emplace_back(e.offset, e.offset + e.length);
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i) {
        if (spans[i].first < spans[i - 1].second) {
            return Status::invalidArgument(where + "destination extents overlap at byte " +
                                           std::to_string(spans[i].first));
        }
    }
    return Status::ok();
}

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
    // Never on a thread of this engine (create()'s deleter): close() joins every thread.
    close();
    backends_.clear();
    timer_.reset();
    if (completion_fd_ >= 0) ::close(completion_fd_);
}

Result<std::shared_ptr<Engine>> Engine::create(EngineConfig config) {
    KVXFER_RETURN_IF_ERROR(applyEnvironment(config));
    if (config.name.empty() || config.name.size() > PeerDescriptor::kMaxName) {
        return Status::invalidArgument("engine name must be 1.." + std::to_string(PeerDescriptor::kMaxName) +
                                       " bytes, got " + std::to_string(config.name.size()));
    }
    if (config.default_timeout.count() <= 0 || config.connect_timeout.count() <= 0) {
        return Status::invalidArgument("timeouts must be positive");
    }
    // The last reference may go on one of the engine's threads (a backend releasing a
    // finished job): the destructor, which joins them all, then runs on another thread.
    std::shared_ptr<Engine> engine(new Engine(std::move(config)),
                                   [](Engine* e) { ThreadGroup::destroyOffGroupThreads([e] { delete e; }); });
    engine->threads_ = std::make_unique<ThreadGroup>();
    engine->instance_id_ = randomInstanceId();
    KVXFER_ASSIGN_OR_RETURN(engine->secret_, auth::randomSecret());
    engine->host_id_ = readHostId();
    engine->completion_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (engine->completion_fd_ < 0) return Status::systemErrno("eventfd", errno);
    engine->timer_ = std::make_unique<DeadlineTimer>(*engine->threads_);

    std::vector<std::string> names = engine->config_.backends;
    if (names.empty()) {
        for (const auto& info : listBackends()) {
            if (info.available && info.on_by_default) names.push_back(info.name);
        }
    }
    BackendContext ctx;
    ctx.engine_name = engine->config_.name;
    ctx.instance_id = engine->instance_id_;
    ctx.secret = engine->secret_;
    ctx.sink = engine.get();
    ctx.config = &engine->config_.backend;
    ctx.threads = engine->threads_.get();
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

std::vector<BackendCaps> Engine::backendCaps() const {
    std::vector<BackendCaps> out;
    for (const auto& b : backends_) out.push_back(b->caps());
    return out;
}

std::string Engine::describeBackends() const {
    std::string out;
    for (size_t i = 0; i < backends_.size(); ++i) out += (i ? "; " : "") + backends_[i]->describe();
    return out;
}

Result<std::shared_ptr<Region>> Engine::registerMemory(const MemorySpan& span, std::optional<KvLayout> layout,
                                                       std::shared_ptr<void> owner) {
    if (span.base == nullptr || span.length == 0) {
        return Status::invalidArgument("cannot register an empty or null buffer");
    }
    if (reinterpret_cast<uintptr_t>(span.base) + span.length < reinterpret_cast<uintptr_t>(span.base)) {
        return Status::invalidArgument("buffer range wraps around the address space");
    }
    if (static_cast<uint32_t>(span.kind) >= kMemoryKindCount) {
        return Status::invalidArgument("unknown memory kind " + std::to_string(static_cast<int>(span.kind)));
    }
    if (span.kind == MemoryKind::kCuda && span.device < 0) {
        return Status::invalidArgument("CUDA memory needs a device ordinal >= 0");
    }
    if (layout) {
        *layout = layout->normalized();
        KVXFER_RETURN_IF_ERROR(layout->validate(span.length));
    }
    if (closed()) return Status::canceled("engine is closed");
    std::shared_ptr<Region> region(new Region());
    region->base_ = span.base;
    region->length_ = span.length;
    region->kind_ = span.kind;
    region->device_ = span.kind == MemoryKind::kCuda ? span.device : -1;
    region->layout_ = layout;
    region->owner_ = std::move(owner);
    RegionDescriptor published;
    published.base_address = reinterpret_cast<uint64_t>(span.base);
    published.length = span.length;
    published.layout = layout;
    published.kind = region->kind_;
    published.device = region->device_;
    // Registration (an MR pin, an fd lookup) happens without the control mutex held.
    bool any = false;
    for (auto& backend : backends_) {
        if (!backend->caps().supports(span.kind)) {
            published.remote_keys.emplace_back();
            region->backend_regions_.push_back(nullptr);
            continue;
        }
        auto reg = backend->registerMemory(span);
        if (!reg.isOk()) return reg.status();
        published.remote_keys.push_back((*reg)->remoteKey());
        region->backend_regions_.push_back(std::move(reg).value());
        any = true;
    }
    if (!any) {
        std::string why;
        if (span.kind == MemoryKind::kCuda) {
            const Status cuda = cuda::cudaAvailability();
            why = cuda.isOk() ? "; start the cuda_ipc backend (backends=[\"cuda_ipc\"])"
                              : "; " + cuda.message();
        }
        return Status::unsupported(std::string("no started backend handles ") + memoryKindName(span.kind) +
                                   " memory (started: " + describeBackends() + ")" + why);
    }
    std::lock_guard<std::mutex> lock(control_mutex_);
    if (closed()) return Status::canceled("engine is closed");
    region->engine_ = shared_from_this();
    region->id_ = next_region_id_++;
    published.id = region->id_;
    regions_[region->id_] = region;
    published_[region->id_] = std::move(published);
    return region;
}

Status Engine::deregisterMemory(const Region& region) {
    {
        std::lock_guard<std::mutex> lock(control_mutex_);
        if (region.engine_.get() != this || published_.erase(region.id_) == 0) {
            return Status::notFound("region " + std::to_string(region.id_) + " is not registered here");
        }
    }
    revoke(const_cast<Region&>(region));
    return Status::ok();
}

void Engine::revoke(Region& region) {
    if (region.deregistered_.exchange(true)) return;
    for (size_t i = 0; i < backends_.size(); ++i) {
        if (BackendRegion* r = region.backendRegion(i)) backends_[i]->revokeMemory(*r);
    }
}

Bytes Engine::descriptor() const {
    PeerDescriptor d;
    d.engine_name = config_.name;
    d.instance_id = instance_id_;
    d.host_id = host_id_;
    d.pid = static_cast<uint32_t>(::getpid());
    d.secret = secret_;
    for (const auto& b : backends_) d.backends.push_back({std::string(b->name()), b->endpointInfo()});
    {
        std::lock_guard<std::mutex> lock(control_mutex_);
        for (const auto& [id, r] : published_) d.regions.push_back(r);
    }
    return encodeDescriptor(d);
}

Result<std::shared_ptr<Peer>> Engine::addPeer(ByteView bytes) {
    KVXFER_ASSIGN_OR_RETURN(PeerDescriptor desc, decodeDescriptor(bytes));
    if (closed()) return Status::canceled("engine is closed");
    if (desc.instance_id == instance_id_) {
        return Status::invalidArgument("descriptor is this engine's own");
    }
    std::shared_ptr<Peer> existing = findPeer(desc.engine_name);

    std::shared_ptr<Peer> peer;
    if (existing && existing->instanceId() == desc.instance_id) {
        peer = existing;  // refresh: import regions it did not have
    } else {
        // Connect without the control mutex: a handshake may take a while.
        peer.reset(new Peer());
        peer->engine_ = shared_from_this();
        peer->name_ = desc.engine_name;
        peer->instance_id_ = desc.instance_id;
        PeerIdentity identity{desc.engine_name, desc.instance_id, desc.pid, desc.host_id == host_id_,
                              desc.secret};
        Status last = Status::unsupported("no common backend with peer '" + desc.engine_name + "'");
        for (size_t i = 0; i < backends_.size() && !peer->connection_; ++i) {
            for (const auto& ep : desc.backends) {
                if (ep.name != backends_[i]->name()) continue;
                const BackendCaps& caps = backends_[i]->caps();
                if (caps.same_host_only && !identity.same_host) break;
                if (caps.same_process_only &&
                    (!identity.same_host || desc.pid != static_cast<uint32_t>(::getpid())))
                    break;
                // Each attempt has its own deadline, so a fallback backend gets its own time.
                auto conn = backends_[i]->connect(identity, ep.info, deadlineAfter(config_.connect_timeout));
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
        if (!backend.caps().supports(region.kind)) continue;  // not addressable through this backend
        KVXFER_ASSIGN_OR_RETURN(auto import, backend.importRemoteRegion(*peer->connection_, region,
                                                                        region.remote_keys[key_index]));
        std::lock_guard<std::mutex> plock(peer->mutex_);
        peer->imports_[region.id] = std::shared_ptr<BackendRemoteRegion>(std::move(import));
    }
    {
        std::lock_guard<std::mutex> plock(peer->mutex_);
        peer->descriptor_ = std::make_shared<const PeerDescriptor>(std::move(desc));
    }
    {
        std::lock_guard<std::mutex> lock(control_mutex_);
        if (closed()) return Status::canceled("engine is closed");
        auto it = peers_.find(peer->name());
        if (it != peers_.end() && it->second != peer) existing = it->second;
        peers_[peer->name()] = peer;
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

Status Engine::planParts(const TransferRequest& req, const PeerDescriptor& snapshot,
                         std::vector<PlannedPart>& out) const {
    const Backend& backend = *backends_[req.peer->backend_index_];
    if (!backend.caps().supports(req.op)) {
        return Status::unsupported(std::string("backend ") + std::string(backend.name()) + " cannot " +
                                   opName(req.op));
    }
    PlanOptions options;
    options.coalesce = req.coalesce;
    options.max_run_bytes = backend.caps().max_run_bytes;
    out.reserve(req.parts.size());
    for (size_t i = 0; i < req.parts.size(); ++i) {
        const TransferPart& part = req.parts[i];
        const std::string where = req.parts.size() > 1 ? "part " + std::to_string(i) + ": " : "";
        if (!part.local) return Status::invalidArgument(where + "no local region given");
        if (part.local->engine_.get() != this) {
            return Status::notFound(where + "local region " + std::to_string(part.local->id()) +
                                    " is not registered with this engine");
        }
        if (part.local->deregistered()) {
            return Status::notFound(where + "local region " + std::to_string(part.local->id()) +
                                    " was deregistered");
        }
        if (part.local->backendRegion(req.peer->backend_index_) == nullptr) {
            return Status::unsupported(where + "local region " + std::to_string(part.local->id()) + " (" +
                                       memoryKindName(part.local->kind()) +
                                       " memory) cannot be reached by backend " +
                                       std::string(backend.name()));
        }
        const RegionDescriptor* remote = nullptr;
        for (const auto& r : snapshot.regions) {
            if (r.id == part.remote_region) remote = &r;
        }
        if (remote == nullptr) {
            return Status::notFound(where + "peer '" + req.peer->name() + "' has no region " +
                                    std::to_string(part.remote_region));
        }
        if (!backend.caps().supports(remote->kind)) {
            return Status::unsupported(
                where + "remote region " + std::to_string(remote->id) + " (" + memoryKindName(remote->kind) +
                " memory) cannot be reached by backend " + std::string(backend.name()));
        }
        // Parts that repeat the previous part's sides over regions of the same shape (one
        // region per layer, the same block ids) share one plan: planning is per shape.
        if (i > 0) {
            const TransferPart& prev = req.parts[i - 1];
            const RegionDescriptor* prev_remote = out.back().remote;
            if (sameSide(part.local_side, prev.local_side) && sameSide(part.remote_side, prev.remote_side) &&
                part.local->length() == prev.local->length() &&
                part.local->layout() == prev.local->layout() && remote->length == prev_remote->length &&
                remote->layout == prev_remote->layout) {
                out.push_back({out.back().plan, remote});
                continue;
            }
        }
        KVXFER_RETURN_IF_ERROR(
            checkDestinationExtents(req.op == Op::kWrite ? part.remote_side : part.local_side, where));
        TransferSide local_side = part.local_side;
        TransferSide remote_side = part.remote_side;
        if (auto* b = std::get_if<BlockSide>(&local_side)) {
            if (!part.local->layout()) {
                return Status::invalidArgument(where + "local region " + std::to_string(part.local->id()) +
                                               " was registered without a KV layout; use extents");
            }
            b->layout = *part.local->layout();
        }
        if (auto* b = std::get_if<BlockSide>(&remote_side)) {
            if (!remote->layout) {
                return Status::invalidArgument(where + "remote region " + std::to_string(remote->id) +
                                               " of peer '" + req.peer->name() +
                                               "' has no KV layout; use extents");
            }
            b->layout = *remote->layout;
        }
        auto plan = makePlan(local_side, part.local->length(), remote_side, remote->length, options);
        if (!plan.isOk()) {
            const Status& st = plan.status();
            return where.empty() ? st : Status(st.code(), where + st.message());
        }
        out.push_back({std::make_shared<const Plan>(std::move(plan).value()), remote});
    }
    return Status::ok();
}

Result<PlanSummary> Engine::plan(const TransferRequest& req) const {
    if (!req.peer) return Status::invalidArgument("no peer given");
    if (req.peer->engine_.get() != this) return Status::invalidArgument("peer belongs to another engine");
    const auto snapshot = req.peer->descriptor();
    std::vector<PlannedPart> planned;
    KVXFER_RETURN_IF_ERROR(planParts(req, *snapshot, planned));
    PlanSummary s;
    for (const auto& p : planned) s.add(*p.plan);
    return s;
}

void Engine::onTerminal(TransferJob& job, bool done) {
    {
        std::lock_guard<std::mutex> lock(stats_mutex_);
        if (done) {
            ++stats_.transfers_done;
            stats_.bytes_done += job.total_bytes;
        } else {
            ++stats_.transfers_failed;
        }
    }
    if (job.watched.load(std::memory_order_acquire)) {
        {
            std::lock_guard<std::mutex> lock(completion_mutex_);
            completed_.push_back(job.id);
        }
        signalCompletion();
    }
}

Result<Transfer> Engine::post(const TransferRequest& req) {
    Result<Transfer> r = postImpl(req);
    // A post racing with close() may find its peer removed or its region revoked by it:
    // that is the close, and says so.
    if (!r.isOk() && r.status().code() == StatusCode::kNotFound && closed()) {
        return Status::canceled("engine is closed");
    }
    return r;
}

Result<Transfer> Engine::postImpl(const TransferRequest& req) {
    const auto t0 = Clock::now();
    if (closed()) return Status::canceled("engine is closed");
    if (!req.peer) return Status::invalidArgument("no peer given");
    if (req.peer->engine_.get() != this) return Status::invalidArgument("peer belongs to another engine");
    if (req.notify.size() > PeerDescriptor::kMaxBlob) {
        return Status::invalidArgument("notification payload is " + std::to_string(req.notify.size()) +
                                       " bytes; the limit is 64 KiB");
    }
    if (req.parts.empty() && req.notify.empty()) {
        return Status::invalidArgument("a transfer needs at least one part or a notification");
    }
    Peer& peer = *req.peer;
    if (peer.removed()) return Status::notFound("peer '" + peer.name() + "' was removed");
    const auto snapshot = peer.descriptor();
    std::vector<PlannedPart> planned;
    KVXFER_RETURN_IF_ERROR(planParts(req, *snapshot, planned));

    Backend& backend = *backends_[peer.backend_index_];
    KVXFER_ASSIGN_OR_RETURN(auto job, makeJob(req, planned, t0));
    Status st = start(backend, job);
    if (st.code() == StatusCode::kPeerUnreachable) {
        // The backend's connection is dead and nothing was started: reconnect once.
        Status again = reconnect(peer, job->peer);
        if (!again.isOk()) {
            return Status(StatusCode::kPeerUnreachable,
                          st.message() + "; reconnecting failed: " + again.message());
        }
        KVXFER_ASSIGN_OR_RETURN(job, makeJob(req, planned, t0));
        st = start(backend, job);
    }
    if (!st.isOk()) return st;  // nothing was started: the job is dropped unfinished
    {
        std::lock_guard<std::mutex> lock(stats_mutex_);
        ++stats_.transfers_posted;
        stats_.runs_posted += job->num_runs;
    }
    // A job the inline path finished already needs no deadline watch.
    if (!job->quiesced()) timer_->watch(job);
    job->telemetry_.post_cpu_us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    return Transfer(std::move(job));
}

Status Engine::start(Backend& backend, const std::shared_ptr<TransferJob>& job) {
    if (job->total_bytes <= backend.caps().inline_max_bytes) {
        KVXFER_ASSIGN_OR_RETURN(const bool taken, backend.trySubmitInline(job));
        if (taken) return Status::ok();
    }
    return backend.submit(job);
}

Result<std::shared_ptr<TransferJob>> Engine::makeJob(const TransferRequest& req,
                                                     const std::vector<PlannedPart>& planned,
                                                     Clock::time_point posted) {
    Peer& peer = *req.peer;
    auto job = std::make_shared<TransferJob>();
    job->id = next_transfer_id_.fetch_add(1, std::memory_order_relaxed);
    job->op = req.op;
    job->backend = backends_[peer.backend_index_].get();
    job->notify = req.notify;
    job->deadline = deadlineAfter(req.timeout.count() > 0 ? req.timeout : config_.default_timeout, posted);
    // What the job keeps alive until it is released: the local regions, the peer (and so
    // the engine), the connection and the remote imports it was built on.
    using Keep = std::pair<std::vector<std::shared_ptr<void>>, std::shared_ptr<BackendPeer>>;
    auto keep = std::make_shared<Keep>();
    keep->first.reserve(req.parts.size() + 1);
    keep->first.push_back(req.peer);
    job->parts.resize(planned.size());
    uint64_t runs = 0, bytes = 0, pieces = 0;
    {
        std::lock_guard<std::mutex> plock(peer.mutex_);
        if (peer.removed_) return Status::notFound("peer '" + peer.name() + "' was removed");
        keep->second = peer.connection_;
        job->peer = peer.connection_.get();
        const void* last_local = nullptr;
        const void* last_import = nullptr;
        for (size_t i = 0; i < planned.size(); ++i) {
            const TransferPart& part = req.parts[i];
            const RegionDescriptor& remote = *planned[i].remote;
            auto import = peer.imports_.find(remote.id);
            if (import == peer.imports_.end()) return Status::internal("remote region not imported");
            JobPart& jp = job->parts[i];
            jp.plan = planned[i].plan;
            jp.local = {part.local->id(),     part.local->base(),
                        part.local->length(), part.local->kind(),
                        part.local->device(), part.local->backendRegion(peer.backend_index_)};
            jp.remote = {remote.id,   remote.base_address, remote.length,
                         remote.kind, remote.device,       import->second.get()};
            jp.first_run = runs;
            runs += jp.plan->numRuns();
            bytes += jp.plan->total_bytes;
            pieces += jp.plan->num_pieces;
            if (part.local.get() != last_local) keep->first.push_back(part.local);
            if (import->second.get() != last_import) keep->first.push_back(import->second);
            last_local = part.local.get();
            last_import = import->second.get();
        }
        if (peer.in_flight_.size() >= 64 && (peer.in_flight_.size() & 63) == 0) {
            std::erase_if(peer.in_flight_, [](const auto& w) { return w.expired(); });
        }
        if (peer.in_flight_.size() >= kMaxInFlightPerPeer) {
            std::erase_if(peer.in_flight_, [](const auto& w) {
                auto j = w.lock();
                return !j || j->quiesced();
            });
            if (peer.in_flight_.size() >= kMaxInFlightPerPeer) {
                return Status::backPressure("peer '" + peer.name() + "' has " +
                                            std::to_string(kMaxInFlightPerPeer) +
                                            " transfers in flight, the limit: wait for some to end");
            }
        }
        // Every field is set before the job is published in in_flight_: from there a
        // concurrent close() or removePeer() may abandon it (and read on_terminal) at once.
        job->num_runs = runs;
        job->total_bytes = bytes;
        job->keepalive = std::move(keep);
        job->on_terminal = [this](TransferJob& j, bool done) { onTerminal(j, done); };
        job->telemetry_.bytes = bytes;
        job->telemetry_.runs = runs;
        job->telemetry_.pieces = pieces;
        job->telemetry_.parts = static_cast<uint32_t>(job->parts.size());
        job->telemetry_.posted = posted;
        peer.in_flight_.push_back(job);
    }
    return job;
}

Status Engine::reconnect(Peer& peer, const BackendPeer* dead) {
    std::lock_guard<std::mutex> serial(peer.reconnect_mutex_);
    std::shared_ptr<const PeerDescriptor> desc;
    {
        std::lock_guard<std::mutex> plock(peer.mutex_);
        if (peer.removed_) return Status::notFound("peer '" + peer.name() + "' was removed");
        if (peer.connection_.get() != dead) return Status::ok();  // another post reconnected meanwhile
        desc = peer.descriptor_;
    }
    Backend& backend = *backends_[peer.backend_index_];
    size_t key_index = 0;
    while (key_index < desc->backends.size() && desc->backends[key_index].name != peer.backend_name_)
        ++key_index;
    if (key_index == desc->backends.size()) return Status::internal("peer descriptor lost its backend");
    PeerIdentity identity{desc->engine_name, desc->instance_id, desc->pid, desc->host_id == host_id_,
                          desc->secret};
    KVXFER_ASSIGN_OR_RETURN(auto conn, backend.connect(identity, desc->backends[key_index].info,
                                                       deadlineAfter(config_.connect_timeout)));
    std::map<uint32_t, std::shared_ptr<BackendRemoteRegion>> imports;
    for (const auto& region : desc->regions) {
        if (!backend.caps().supports(region.kind)) continue;
        KVXFER_ASSIGN_OR_RETURN(auto import,
                                backend.importRemoteRegion(*conn, region, region.remote_keys[key_index]));
        imports[region.id] = std::shared_ptr<BackendRemoteRegion>(std::move(import));
    }
    std::lock_guard<std::mutex> plock(peer.mutex_);
    peer.connection_ = std::move(conn);
    peer.imports_ = std::move(imports);
    return Status::ok();
}

Status Engine::notify(Peer& peer, ByteView payload, std::chrono::milliseconds timeout) {
    if (peer.engine_.get() != this) return Status::invalidArgument("peer belongs to another engine");
    if (peer.removed()) return Status::notFound("peer '" + peer.name() + "' was removed");
    if (payload.size() > PeerDescriptor::kMaxBlob) {
        return Status::invalidArgument("notification payload is larger than 64 KiB");
    }
    std::shared_ptr<BackendPeer> conn;
    {
        std::lock_guard<std::mutex> plock(peer.mutex_);
        conn = peer.connection_;
    }
    return backends_[peer.backend_index_]->notify(
        *conn, payload, deadlineAfter(timeout.count() > 0 ? timeout : config_.default_timeout));
}

void Engine::signalCompletion() {
    const uint64_t one = 1;
    (void)!::write(completion_fd_, &one, sizeof(one));
}

void Engine::watch(const Transfer& transfer) {
    TransferJob& job = *transfer.job();
    job.watched.store(true, std::memory_order_release);
    if (job.progress != nullptr) job.progress->release(job);  // no thread will wait on it
    // Ended before it was watched: on_terminal did not report it; report it now. (A job
    // ending concurrently may be reported twice; drainCompletions() callers ignore ids
    // they no longer wait for.)
    if (job.state() != TransferState::kPending) {
        {
            std::lock_guard<std::mutex> lock(completion_mutex_);
            completed_.push_back(job.id);
        }
        signalCompletion();
    }
}

std::vector<uint64_t> Engine::drainCompletions() {
    uint64_t v = 0;
    (void)!::read(completion_fd_, &v, sizeof(v));
    std::lock_guard<std::mutex> lock(completion_mutex_);
    std::vector<uint64_t> out;
    out.swap(completed_);
    return out;
}

// The received-notification queue's bounds: a receiver that never takes notifications
// stops its senders (typed back-pressure) instead of growing without limit.
constexpr size_t kMaxQueuedNotifications = 65536;
constexpr uint64_t kMaxQueuedNotificationBytes = 64ull << 20;

Status Engine::deliver(std::string peer_name, uint64_t peer_instance, Bytes payload) {
    {
        std::lock_guard<std::mutex> lock(notify_mutex_);
        if (notifications_.size() >= kMaxQueuedNotifications ||
            queued_bytes_ + payload.size() > kMaxQueuedNotificationBytes) {
            return Status::backPressure("engine '" + config_.name + "' has " +
                                        std::to_string(notifications_.size()) + " notifications (" +
                                        std::to_string(queued_bytes_) +
                                        " bytes) waiting to be taken, the limit: its application is not "
                                        "taking them");
        }
        queued_bytes_ += payload.size();
        notifications_.push_back({std::move(peer_name), peer_instance, std::move(payload)});
    }
    {
        std::lock_guard<std::mutex> lock(stats_mutex_);
        ++stats_.notifications_received;
    }
    notify_cv_.notify_all();
    signalCompletion();
    return Status::ok();
}

void Engine::onRoom(std::function<void()> fn) {
    std::lock_guard<std::mutex> lock(notify_mutex_);
    room_waiters_.push_back(std::move(fn));
}

std::vector<Notification> Engine::takeNotifications(size_t max) {
    std::vector<Notification> out;
    std::vector<std::function<void()>> waiters;
    {
        std::lock_guard<std::mutex> lock(notify_mutex_);
        const size_t n = max == 0 ? notifications_.size() : std::min(max, notifications_.size());
        out.assign(std::make_move_iterator(notifications_.begin()),
                   std::make_move_iterator(notifications_.begin() + n));
        notifications_.erase(notifications_.begin(), notifications_.begin() + n);
        for (const auto& note : out) queued_bytes_ -= note.payload.size();
        if (n > 0) waiters.swap(room_waiters_);
    }
    for (auto& fn : waiters) fn();
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

void Engine::close() {
    std::map<std::string, std::shared_ptr<Peer>> peers;
    std::vector<std::shared_ptr<Region>> regions;
    bool first = false;
    {
        std::lock_guard<std::mutex> lock(control_mutex_);
        first = !closed_.exchange(true);
        if (first) {
            peers.swap(peers_);
            published_.clear();
            for (auto& [id, w] : regions_) {
                if (auto r = w.lock()) regions.push_back(std::move(r));
            }
        }
    }
    if (first) {
        // Peers reach none of this engine's memory any more.
        for (auto& r : regions) revoke(*r);
        regions.clear();
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
        peers.clear();
        // No thread starts from here on; every thread is told to stop (none is waited for:
        // this may be one of them).
        threads_->close();
        for (auto& backend : backends_) backend->shutdown();
        if (timer_) timer_->stop();
        {
            std::lock_guard<std::mutex> lock(close_mutex_);
            stopped_ = true;
        }
        close_cv_.notify_all();
    } else if (!threads_->onGroupThread()) {
        // A concurrent first close() may still be telling threads to stop.
        std::unique_lock<std::mutex> lock(close_mutex_);
        close_cv_.wait(lock, [&] { return stopped_; });
    }
    // Not on one of our own threads: joins them all. On one: joins those that ended.
    threads_->joinAll();
}

}  // namespace kvxfer
