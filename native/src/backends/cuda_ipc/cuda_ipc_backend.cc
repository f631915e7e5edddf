// cuda_ipc: GPU-to-GPU transfers between processes of one host (NVLink or PCIe peer
// access), and between engines of one process.
//
// - Registration: a CUDA region's key carries the legacy CUDA IPC handle of the
//   allocation holding it (cuIpcGetMemHandle on the base cuMemGetAddressRange finds),
//   the region's offset in that allocation, and the GPU's PCI bus id. docs/gpu.md says
//   why legacy IPC rather than VMM shareable handles.
// - Import: the handle is opened lazily, once per (allocation, local GPU) and process
//   (ipc_mapping.h), in the context of the GPU the transfer runs on; an engine of the
//   same process uses the peer's pointer directly.
// - A transfer is ONE kernel launch on the local GPU (cuda/copy.h): the job's runs, cut
//   into entries of at most 64 KiB, go into a pinned run table, uploaded on the GPU's
//   stream before the launch; the kernel pushes (WRITE) or pulls (READ) through the
//   peer mapping. A CUDA event recorded after it is watched by the backend's one
//   progress thread, which then reports the data (the kernel ends with a system-scope
//   fence, and the event completes only after the kernel's stores are performed) and
//   sends the notification over the peer's Unix socket (notify_channel.h).
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "backends/cuda_ipc/ipc_mapping.h"
#include "backends/cuda_ipc/notify_channel.h"
#include "backends/factories.h"
#include "cuda/copy.h"

namespace kvxfer {
namespace {

using cuda::CudaApi;
using cuda::DeviceState;

constexpr uint8_t kKeyVersion = 1;
constexpr size_t kBusIdBytes = 16;
// u8 version | u8 ipc ok | i32 device | u32 pid | u64 offset | u64 alloc bytes | 16 B bus id | 64 B handle
constexpr size_t kKeyBytes = 1 + 1 + 4 + 4 + 8 + 8 + kBusIdBytes + 64;

struct CudaRegion : BackendRegion {
    Bytes key;
    Bytes remoteKey() const override { return key; }
};

struct CudaPeer : BackendPeer {
    std::string name;
    uint32_t pid = 0;
    bool same_process = false;
    std::shared_ptr<cudaipc::NotifySender> sender;
};

struct CudaRemoteRegion : BackendRemoteRegion {
    bool same_process = false;
    bool ipc_ok = false;
    uint64_t address = 0;  // the peer's pointer (same process only)
    uint64_t offset = 0;   // in the allocation
    int32_t device = -1;   // the peer's ordinal (its numbering)
    std::string bus_id;
    cuda::CUipcMemHandle handle{};
    std::mutex mutex;  // guards mappings (opened by the progress thread, read by it only)
    std::map<int, std::unique_ptr<cudaipc::IpcMapping>> mappings;
};

std::string socketName(uint64_t instance) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "kvxfer-cuda-%016llx", static_cast<unsigned long long>(instance));
    return buf;
}

// Per local GPU: its stream and the run tables in flight on it.
struct DeviceLane {
    DeviceState* device = nullptr;
    cuda::CUstream stream = nullptr;
    std::vector<std::unique_ptr<cuda::TableBuffer>> tables;
    // The copy rate seen on this lane (a moving average over transfers of >= 1 MiB), and
    // when its stream's queued work is expected to be done: TransferJob::expectDataAt.
    double ns_per_byte = 0;
    Clock::time_point busy_until{};
    Clock::time_point last_done{};
};

struct InFlight {
    std::shared_ptr<TransferJob> job;
    cuda::TableBuffer* table = nullptr;
    DeviceLane* lane = nullptr;
    Clock::time_point launched{};
};

constexpr uint64_t kRateMinBytes = 1 << 20;

// Everything the progress thread touches; shared so the thread never holds the backend.
struct Worker {
    const CudaApi* api = nullptr;
    std::mutex mutex;
    std::condition_variable cv;
    std::deque<std::shared_ptr<TransferJob>> queue;
    bool stopping = false;
    std::map<int, DeviceLane> lanes;  // progress thread only
    std::deque<InFlight> in_flight;   // progress thread only
    std::map<std::pair<int, int>, bool> peer_enabled;
    // Runs at least this long are copied by the copy engines (cuMemcpyDtoDAsync) rather than
    // the kernel: KVXFER_CUDA_IPC_CE_MIN_BYTES, 0 = never; default 8 MiB.
    uint64_t ce_min_bytes = UINT64_MAX;
    // After the last transfer in flight ends, the thread keeps polling the queue this long
    // before sleeping, so a caller posting one transfer after another (queue depth 1) does
    // not pay the thread's wake-up each time: KVXFER_CUDA_IPC_LINGER_US, default 1000.
    Clock::duration linger = std::chrono::microseconds(1000);
    std::atomic<size_t> queued{0};

    Result<DeviceLane*> lane(int ordinal) {
        auto it = lanes.find(ordinal);
        if (it != lanes.end()) return &it->second;
        KVXFER_ASSIGN_OR_RETURN(DeviceState * d, DeviceState::get(ordinal));
        cuda::ScopedContext scope(api, d->context);
        KVXFER_RETURN_IF_ERROR(scope.status());
        DeviceLane l;
        l.device = d;
        const cuda::CUresult r = api->streamCreate(&l.stream, cuda::kStreamNonBlocking);
        if (r != cuda::CUDA_SUCCESS) return api->error("cuStreamCreate", r);
        return &lanes.emplace(ordinal, std::move(l)).first->second;
    }

    // The peer region's address as the local GPU `lane` reaches it.
    Result<uint64_t> remoteBase(DeviceLane& lane, CudaRemoteRegion& remote) {
        if (remote.same_process) {
            // Same process: the pointer works as is; a different GPU needs peer access.
            KVXFER_ASSIGN_OR_RETURN(int owner, cuda::pointerDevice(remote.address));
            if (owner != lane.device->ordinal) KVXFER_RETURN_IF_ERROR(enablePeer(lane, owner));
            return remote.address;
        }
        if (!remote.ipc_ok) {
            return Status::unsupported(
                "the peer's CUDA region is not exportable by legacy CUDA IPC (allocated with the VMM API, "
                "e.g. torch's expandable_segments, or cudaMallocAsync pools): cuda_ipc cannot map it");
        }
        std::lock_guard<std::mutex> lock(remote.mutex);
        auto it = remote.mappings.find(lane.device->ordinal);
        if (it == remote.mappings.end()) {
            cuda::CUdevice owner = 0;
            if (!remote.bus_id.empty() && api->deviceGetByPCIBusId(&owner, remote.bus_id.c_str()) == 0 &&
                owner != lane.device->device) {
                int can = 0;
                api->deviceCanAccessPeer(&can, lane.device->device, owner);
                if (!can) {
                    return Status::unsupported("cuda:" + std::to_string(lane.device->ordinal) + " (" +
                                               lane.device->pci_bus_id + ") cannot access the peer's GPU " +
                                               remote.bus_id +
                                               " by peer access (no NVLink or PCIe P2P path)");
                }
            }
            KVXFER_ASSIGN_OR_RETURN(auto m, cudaipc::IpcMapping::open(lane.device, remote.handle));
            it = remote.mappings.emplace(lane.device->ordinal, std::move(m)).first;
        }
        return it->second->base() + remote.offset;
    }

    Status enablePeer(DeviceLane& lane, int owner) {
        auto key = std::make_pair(lane.device->ordinal, owner);
        if (peer_enabled.count(key)) return Status::ok();
        KVXFER_ASSIGN_OR_RETURN(DeviceState * other, DeviceState::get(owner));
        int can = 0;
        api->deviceCanAccessPeer(&can, lane.device->device, other->device);
        if (!can) {
            return Status::unsupported("cuda:" + std::to_string(lane.device->ordinal) +
                                       " cannot access cuda:" + std::to_string(owner) +
                                       " by peer access (no NVLink or PCIe P2P path)");
        }
        cuda::ScopedContext scope(api, lane.device->context);
        const cuda::CUresult r = api->ctxEnablePeerAccess(other->context, 0);
        if (r != cuda::CUDA_SUCCESS && r != cuda::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED) {
            return api->error("cuCtxEnablePeerAccess", r);
        }
        peer_enabled[key] = true;
        return Status::ok();
    }

    // Builds the job's run table and launches it; on success the job is in flight.
    Status start(const std::shared_ptr<TransferJob>& job) {
        if (job->parts.empty() || job->total_bytes == 0) {  // a notification-only transfer
            complete(job, Status::ok(), true);
            return Status::ok();
        }
        int ordinal = -1;
        for (const JobPart& p : job->parts) {
            if (ordinal >= 0 && p.local.device != ordinal) {
                return Status::unsupported(
                    "a cuda_ipc transfer moves the memory of one local GPU: post one transfer per GPU");
            }
            ordinal = p.local.device;
        }
        KVXFER_ASSIGN_OR_RETURN(DeviceLane * lane, this->lane(ordinal));
        cuda::ScopedContext scope(api, lane->device->context);
        KVXFER_RETURN_IF_ERROR(scope.status());
        cuda::TableBuffer* table = nullptr;
        for (auto& t : lane->tables) {
            bool busy = false;
            for (const InFlight& f : in_flight) busy |= f.table == t.get();
            if (!busy && t->idle()) {
                table = t.get();
                break;
            }
        }
        if (table == nullptr) {
            lane->tables.push_back(std::make_unique<cuda::TableBuffer>(lane->device));
            table = lane->tables.back().get();
        }
        // Every part with the same runs (one region, or a group moving the same ids): the
        // table is the runs once plus one base pair per plane.
        const std::vector<Run>& runs0 = job->parts[0].plan->runs;
        bool shared = true;
        uint64_t nplanes = 0;
        for (const JobPart& p : job->parts) {
            shared = shared && (p.plan->runs.data() == runs0.data() || p.plan->runs == runs0);
            nplanes += p.plan->planes.size();
            for (const Run& r : p.plan->runs) shared = shared && r.length < ce_min_bytes;
        }
        const bool write = job->op == Op::kWrite;
        if (shared && runs0.size() * nplanes > 1) {
            uint64_t bound = nplanes;
            for (const Run& r : runs0) bound += cuda::entriesFor(r.length);
            KVXFER_ASSIGN_OR_RETURN(cuda::RunEntry * out, table->reserve(bound));
            uint64_t nruns = 0;
            for (const Run& r : runs0) {
                nruns += cuda::appendRun(out + nruns, write ? r.local_offset : r.remote_offset,
                                         write ? r.remote_offset : r.local_offset, r.length);
            }
            uint64_t k = nruns;
            for (const JobPart& p : job->parts) {
                KVXFER_ASSIGN_OR_RETURN(uint64_t remote,
                                        remoteBase(*lane, *static_cast<CudaRemoteRegion*>(p.remote.backend)));
                const uint64_t local = reinterpret_cast<uint64_t>(p.local.base);
                for (const Plane& plane : p.plan->planes) {
                    const uint64_t l = local + plane.local_base;
                    const uint64_t m = remote + plane.remote_base;
                    out[k++] = {write ? l : m, write ? m : l, 0};
                }
            }
            KVXFER_RETURN_IF_ERROR(table->launchPlanes(nruns, nplanes, lane->stream));
            track(job, table, *lane);
            return Status::ok();
        }
        uint64_t bound = 0;
        for (const JobPart& p : job->parts) {
            bound += p.plan->numRuns() + p.plan->total_bytes / cuda::kChunkBytes + p.plan->planes.size();
        }
        KVXFER_ASSIGN_OR_RETURN(cuda::RunEntry * out, table->reserve(bound));
        uint64_t n = 0;
        for (const JobPart& p : job->parts) {
            KVXFER_ASSIGN_OR_RETURN(uint64_t remote,
                                    remoteBase(*lane, *static_cast<CudaRemoteRegion*>(p.remote.backend)));
            const uint64_t local = reinterpret_cast<uint64_t>(p.local.base);
            for (const Plane& plane : p.plan->planes) {
                const uint64_t lb = local + plane.local_base;
                const uint64_t rb = remote + plane.remote_base;
                for (const Run& r : p.plan->runs) {
                    const uint64_t l = lb + r.local_offset;
                    const uint64_t m = rb + r.remote_offset;
                    if (r.length >= ce_min_bytes) {
                        // Long runs go to the copy engines, queued before the kernel.
                        const cuda::CUresult cr =
                            api->memcpyDtoDAsync(write ? m : l, write ? l : m, r.length, lane->stream);
                        if (cr != cuda::CUDA_SUCCESS) return api->error("cuMemcpyDtoDAsync", cr);
                        continue;
                    }
                    n += cuda::appendRun(out + n, write ? l : m, write ? m : l, r.length);
                }
            }
        }
        KVXFER_RETURN_IF_ERROR(table->launch(n, lane->stream));
        track(job, table, *lane);
        return Status::ok();
    }

    // A launched job is in flight; with a known rate, the core learns when it should end.
    void track(const std::shared_ptr<TransferJob>& job, cuda::TableBuffer* table, DeviceLane& lane) {
        const auto now = Clock::now();
        in_flight.push_back({job, table, &lane, now});
        if (lane.ns_per_byte > 0) {
            const auto eta =
                std::max(now, lane.busy_until) +
                std::chrono::nanoseconds(static_cast<int64_t>(lane.ns_per_byte * job->total_bytes));
            lane.busy_until = eta;
            job->expectDataAt(eta);
        }
    }

    // The job's copy ended (its event completed) at `now`: update the lane's rate.
    static void learnRate(const InFlight& f, Clock::time_point now) {
        DeviceLane& lane = *f.lane;
        const auto start = std::max(f.launched, lane.last_done);  // queued behind the previous one
        lane.last_done = now;
        const uint64_t bytes = f.job->total_bytes;
        if (bytes < kRateMinBytes || now <= start) return;
        const double sample = std::chrono::duration<double, std::nano>(now - start).count() / bytes;
        lane.ns_per_byte = lane.ns_per_byte > 0 ? 0.75 * lane.ns_per_byte + 0.25 * sample : sample;
    }

    static void complete(const std::shared_ptr<TransferJob>& job, Status status, bool all_moved) {
        if (job->dataDone(std::move(status), all_moved) == TransferJob::AfterData::kSendNotification) {
            auto& peer = static_cast<CudaPeer&>(*job->peer);
            // Sent now, or queued to the notifier thread (which finishes the job).
            if (auto sent = peer.sender->sendForJob(job)) job->finish(std::move(*sent));
        }
    }

    void run() {
        Clock::time_point linger_until{};
        for (;;) {
            std::deque<std::shared_ptr<TransferJob>> fresh;
            if (in_flight.empty() && queued.load(std::memory_order_acquire) == 0 &&
                Clock::now() < linger_until) {
                std::this_thread::yield();  // lingering: a new job is likely to come soon
                continue;
            }
            {
                std::unique_lock<std::mutex> lock(mutex);
                if (in_flight.empty()) cv.wait(lock, [&] { return stopping || !queue.empty(); });
                if (stopping && queue.empty() && in_flight.empty()) return;
                fresh.swap(queue);
                queued.store(0, std::memory_order_release);
            }
            for (auto& job : fresh) {
                if (job->abandoned()) {
                    complete(job, Status::ok(), false);
                    continue;
                }
                Status st = start(job);
                if (!st.isOk()) complete(job, std::move(st), false);
            }
            // Events complete in stream order: watch the oldest of each lane first.
            bool progressed = false;
            for (auto it = in_flight.begin(); it != in_flight.end();) {
                const cuda::CUresult r = api->eventQuery(it->table->done());
                if (r == cuda::CUDA_ERROR_NOT_READY) {
                    ++it;
                    continue;
                }
                if (r == cuda::CUDA_SUCCESS) learnRate(*it, Clock::now());
                auto job = std::move(it->job);
                it = in_flight.erase(it);
                progressed = true;
                if (in_flight.empty()) linger_until = Clock::now() + linger;
                complete(job, r == cuda::CUDA_SUCCESS ? Status::ok() : api->error("the copy kernel", r),
                         r == cuda::CUDA_SUCCESS);
            }
            if (!progressed && !in_flight.empty()) std::this_thread::yield();
        }
    }
};

class CudaIpcBackend final : public Backend {
public:
    static Result<std::unique_ptr<Backend>> create(const BackendContext& ctx) {
        KVXFER_ASSIGN_OR_RETURN(const CudaApi* api, cuda::loadCuda());
        KVXFER_ASSIGN_OR_RETURN(
            auto listener, cudaipc::NotifyListener::start(*ctx.threads, cudaipc::notifyProtocol(),
                                                          socketName(ctx.instance_id), ctx.secret, ctx.sink));
        return std::unique_ptr<Backend>(new CudaIpcBackend(ctx, api, std::move(listener)));
    }

    ~CudaIpcBackend() override { shutdown(); }

    // The worker starts no more kernels, waits for those in flight (the GPU may still touch
    // their memory) and returns; queued notifications end; the listener closes. The engine
    // joins the threads.
    void shutdown() override {
        {
            std::lock_guard<std::mutex> lock(worker_->mutex);
            worker_->stopping = true;
        }
        worker_->cv.notify_all();
        notifier_->stop();
        listener_->stop();
    }

    std::string_view name() const override { return "cuda_ipc"; }
    const BackendCaps& caps() const override { return caps_; }
    std::string describe() const override {
        return "cuda_ipc (legacy CUDA IPC handles, one copy kernel per transfer through peer mappings)";
    }

    Bytes endpointInfo() const override {
        const std::string sock = listener_->name();
        Bytes out(4 + sock.size());
        const uint32_t pid = static_cast<uint32_t>(::getpid());
        std::memcpy(out.data(), &pid, 4);
        std::memcpy(out.data() + 4, sock.data(), sock.size());
        return out;
    }

    Result<std::unique_ptr<BackendRegion>> registerMemory(const MemorySpan& span) override {
        KVXFER_ASSIGN_OR_RETURN(int owner, cuda::pointerDevice(reinterpret_cast<uint64_t>(span.base)));
        if (owner != span.device) {
            return Status::invalidArgument("CUDA memory at " +
                                           std::to_string(reinterpret_cast<uint64_t>(span.base)) +
                                           " is on cuda:" + std::to_string(owner) +
                                           ", not cuda:" + std::to_string(span.device) + " as registered");
        }
        KVXFER_ASSIGN_OR_RETURN(DeviceState * d, DeviceState::get(span.device));
        cuda::ScopedContext scope(api_, d->context);
        KVXFER_RETURN_IF_ERROR(scope.status());
        cuda::CUdeviceptr base = 0;
        size_t size = 0;
        const uint64_t ptr = reinterpret_cast<uint64_t>(span.base);
        cuda::CUresult r = api_->memGetAddressRange(&base, &size, ptr);
        if (r != cuda::CUDA_SUCCESS) return api_->error("cuMemGetAddressRange", r);
        if (ptr + span.length > base + size) {
            return Status::invalidArgument(
                "CUDA region of " + std::to_string(span.length) +
                " bytes runs past the end of its allocation (" + std::to_string(size) + " bytes from " +
                std::to_string(ptr - base) + " bytes before it): one region must lie in one allocation");
        }
        int capable = 0;
        api_->pointerGetAttribute(&capable, cuda::kPointerAttrIsLegacyIpcCapable, ptr);
        cuda::CUipcMemHandle handle{};
        if (capable) {
            r = api_->ipcGetMemHandle(&handle, base);
            if (r != cuda::CUDA_SUCCESS) capable = 0;
        }
        auto region = std::make_unique<CudaRegion>();
        Bytes& k = region->key;
        k.assign(kKeyBytes, 0);
        const uint32_t pid = static_cast<uint32_t>(::getpid());
        const uint64_t offset = ptr - base;
        const uint64_t alloc = size;
        k[0] = kKeyVersion;
        k[1] = capable ? 1 : 0;
        std::memcpy(k.data() + 2, &span.device, 4);
        std::memcpy(k.data() + 6, &pid, 4);
        std::memcpy(k.data() + 10, &offset, 8);
        std::memcpy(k.data() + 18, &alloc, 8);
        std::memcpy(k.data() + 26, d->pci_bus_id.data(), std::min(d->pci_bus_id.size(), kBusIdBytes - 1));
        std::memcpy(k.data() + 26 + kBusIdBytes, handle.reserved, 64);
        return std::unique_ptr<BackendRegion>(std::move(region));
    }

    Result<std::shared_ptr<BackendPeer>> connect(const PeerIdentity& identity, ByteView info,
                                                 Clock::time_point deadline) override {
        if (!identity.same_host) return Status::unsupported("cuda_ipc reaches engines on this host only");
        if (info.size() < 5 || info.size() > 4 + 100) {
            return Status::badDescriptor("cuda_ipc endpoint info of peer '" + identity.name +
                                         "' is malformed");
        }
        auto peer = std::make_shared<CudaPeer>();
        peer->name = identity.name;
        std::memcpy(&peer->pid, info.data(), 4);
        if (peer->pid != identity.pid) {
            return Status::badDescriptor("cuda_ipc endpoint pid does not match peer '" + identity.name + "'");
        }
        peer->same_process = peer->pid == static_cast<uint32_t>(::getpid());
        const std::string sock(reinterpret_cast<const char*>(info.data() + 4), info.size() - 4);
        KVXFER_ASSIGN_OR_RETURN(peer->sender, cudaipc::connectSender(sock, identity, self_name_,
                                                                     self_instance_, deadline, notifier_));
        return std::shared_ptr<BackendPeer>(std::move(peer));
    }

    Result<std::unique_ptr<BackendRemoteRegion>> importRemoteRegion(BackendPeer& backend_peer,
                                                                    const RegionDescriptor& region,
                                                                    ByteView key) override {
        auto& peer = static_cast<CudaPeer&>(backend_peer);
        if (key.size() != kKeyBytes || key[0] != kKeyVersion) {
            return Status::badDescriptor("cuda_ipc key of region " + std::to_string(region.id) +
                                         " of peer '" + peer.name + "' is malformed");
        }
        auto remote = std::make_unique<CudaRemoteRegion>();
        remote->same_process = peer.same_process;
        remote->ipc_ok = key[1] != 0;
        remote->address = region.base_address;
        std::memcpy(&remote->device, key.data() + 2, 4);
        std::memcpy(&remote->offset, key.data() + 10, 8);
        const char* bus = reinterpret_cast<const char*>(key.data() + 26);
        remote->bus_id.assign(bus, strnlen(bus, kBusIdBytes));
        std::memcpy(remote->handle.reserved, key.data() + 26 + kBusIdBytes, 64);
        return std::unique_ptr<BackendRemoteRegion>(std::move(remote));
    }

    Status submit(const std::shared_ptr<TransferJob>& job) override {
        {
            std::lock_guard<std::mutex> lock(worker_->mutex);
            if (worker_->stopping) return Status::canceled("cuda_ipc backend is closing");
            worker_->queue.push_back(job);
            worker_->queued.fetch_add(1, std::memory_order_release);
        }
        worker_->cv.notify_one();
        return Status::ok();
    }

    Status notify(BackendPeer& peer, ByteView payload, Clock::time_point deadline) override {
        return static_cast<CudaPeer&>(peer).sender->send(payload, deadline);
    }

private:
    CudaIpcBackend(const BackendContext& ctx, const CudaApi* api,
                   std::shared_ptr<cudaipc::NotifyListener> listener)
        : api_(api),
          listener_(std::move(listener)),
          notifier_(notify_socket::Notifier::start(*ctx.threads)),
          self_name_(ctx.engine_name),
          self_instance_(ctx.instance_id) {
        worker_ = std::make_shared<Worker>();
        worker_->api = api;
        const char* ce = std::getenv("KVXFER_CUDA_IPC_CE_MIN_BYTES");
        const uint64_t ce_min = ce != nullptr && *ce ? std::strtoull(ce, nullptr, 10) : (8ull << 20);
        worker_->ce_min_bytes = ce_min == 0 ? UINT64_MAX : ce_min;
        if (const char* l = std::getenv("KVXFER_CUDA_IPC_LINGER_US"); l != nullptr && *l) {
            worker_->linger = std::chrono::microseconds(std::strtoull(l, nullptr, 10));
        }
        ctx.threads->spawn([w = worker_] { w->run(); });  // at engine creation: the group is open
    }

    BackendCaps caps_{.memory_kinds = memoryKindBit(MemoryKind::kCuda), .same_host_only = true};
    const CudaApi* api_;
    std::shared_ptr<cudaipc::NotifyListener> listener_;
    std::shared_ptr<notify_socket::Notifier> notifier_;  // started with the engine: never null
    std::string self_name_;
    uint64_t self_instance_;
    std::shared_ptr<Worker> worker_;
};

}  // namespace

Status cudaIpcAvailability() { return cuda::cudaAvailability(); }

Result<std::unique_ptr<Backend>> createCudaIpcBackend(const BackendContext& context) {
    return CudaIpcBackend::create(context);
}

}  // namespace kvxfer
