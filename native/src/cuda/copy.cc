#include "cuda/copy.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

namespace kvxfer::cuda {
namespace {

const char kPtx[] =
#include "cuda/copy_kernel_ptx.inc"
    ;

long envInt(const char* name, long fallback, long lo, long hi) {
    const char* v = std::getenv(name);
    if (v == nullptr || *v == 0) return fallback;
    char* end = nullptr;
    const long x = std::strtol(v, &end, 10);
    return (end != nullptr && *end == 0 && x >= lo && x <= hi) ? x : fallback;
}

Result<std::unique_ptr<DeviceState>> makeDevice(int ordinal) {
    KVXFER_ASSIGN_OR_RETURN(const CudaApi* api, loadCuda());
    int count = 0;
    api->deviceGetCount(&count);
    if (ordinal < 0 || ordinal >= count) {
        return Status::invalidArgument("CUDA device " + std::to_string(ordinal) +
                                       " does not exist (this process sees " + std::to_string(count) + ")");
    }
    auto d = std::make_unique<DeviceState>();
    d->api = api;
    d->ordinal = ordinal;
    CUresult r = api->deviceGet(&d->device, ordinal);
    if (r != CUDA_SUCCESS) return api->error("cuDeviceGet(" + std::to_string(ordinal) + ")", r);
    r = api->primaryCtxRetain(&d->context, d->device);
    if (r != CUDA_SUCCESS) return api->error("cuDevicePrimaryCtxRetain", r);
    char bus[32] = {};
    if (api->deviceGetPCIBusId(bus, sizeof(bus), d->device) == CUDA_SUCCESS) d->pci_bus_id = bus;
    api->deviceGetAttribute(&d->sms, kAttrMultiprocessorCount, d->device);
    if (d->sms < 1) d->sms = 1;
    ScopedContext scope(api, d->context);
    KVXFER_RETURN_IF_ERROR(scope.status());
    CUmodule module = nullptr;
    r = api->moduleLoadData(&module, kPtx);
    if (r != CUDA_SUCCESS) return api->error("loading kvxfer's copy kernel (cuModuleLoadData of its PTX)", r);
    d->unroll = static_cast<int>(envInt("KVXFER_CUDA_COPY_UNROLL", 4, 2, 8));
    if (d->unroll != 2 && d->unroll != 8) d->unroll = 4;
    d->threads = static_cast<unsigned>(envInt("KVXFER_CUDA_COPY_THREADS", 512, 64, 1024)) / 32 * 32;
    d->ctas_per_sm = static_cast<unsigned>(envInt("KVXFER_CUDA_COPY_CTAS_PER_SM", 2048 / d->threads, 1, 32));
    const std::string fn = "kvxfer_copy_runs_u" + std::to_string(d->unroll);
    r = api->moduleGetFunction(&d->kernel, module, fn.c_str());
    if (r != CUDA_SUCCESS) return api->error("cuModuleGetFunction(" + fn + ")", r);
    const std::string fp = "kvxfer_copy_planes_u" + std::to_string(d->unroll);
    r = api->moduleGetFunction(&d->kernel_planes, module, fp.c_str());
    if (r != CUDA_SUCCESS) return api->error("cuModuleGetFunction(" + fp + ")", r);
    return d;
}

}  // namespace

Result<DeviceState*> DeviceState::get(int ordinal) {
    static std::mutex mutex;
    static std::map<int, std::unique_ptr<DeviceState>> devices;  // never destroyed: see below
    std::lock_guard<std::mutex> lock(mutex);
    auto it = devices.find(ordinal);
    if (it != devices.end()) return it->second.get();
    KVXFER_ASSIGN_OR_RETURN(auto d, makeDevice(ordinal));
    DeviceState* raw = d.get();
    // Kept for the life of the process: module and context teardown at exit would race
    // the driver's own atexit teardown.
    devices.emplace(ordinal, std::move(d));
    return raw;
}

Status DeviceState::launch(CUdeviceptr table, uint64_t count, uint64_t src_base, uint64_t dst_base, bool swap,
                           CUstream stream) const {
    if (count == 0) return Status::ok();
    const unsigned grid =
        static_cast<unsigned>(std::min<uint64_t>(count, static_cast<uint64_t>(sms) * ctas_per_sm));
    unsigned long long t = table, c = count, s = src_base, d = dst_base;
    int sw = swap ? 1 : 0;
    void* params[] = {&t, &c, &s, &d, &sw};
    const CUresult r = api->launchKernel(kernel, grid, 1, 1, threads, 1, 1, 0, stream, params, nullptr);
    if (r != CUDA_SUCCESS) return api->error("launching kvxfer's copy kernel", r);
    return Status::ok();
}

Status DeviceState::launchPlanes(CUdeviceptr table, uint64_t nruns, uint64_t nplanes, CUstream stream) const {
    if (nruns == 0 || nplanes == 0) return Status::ok();
    const unsigned grid =
        static_cast<unsigned>(std::min<uint64_t>(nruns * nplanes, static_cast<uint64_t>(sms) * ctas_per_sm));
    unsigned long long runs = table, n = nruns, planes = table + nruns * sizeof(RunEntry), m = nplanes;
    void* params[] = {&runs, &n, &planes, &m};
    const CUresult r =
        api->launchKernel(kernel_planes, grid, 1, 1, threads, 1, 1, 0, stream, params, nullptr);
    if (r != CUDA_SUCCESS) return api->error("launching kvxfer's copy kernel (planes)", r);
    return Status::ok();
}

ScopedContext::ScopedContext(const CudaApi* api, CUcontext ctx) : api_(api) {
    if (api->ctxGetCurrent(&previous_) != CUDA_SUCCESS) previous_ = nullptr;
    if (previous_ == ctx) return;
    const CUresult r = api->ctxSetCurrent(ctx);
    if (r != CUDA_SUCCESS) {
        status_ = api->error("cuCtxSetCurrent", r);
        return;
    }
    restore_ = true;
}

ScopedContext::~ScopedContext() {
    if (restore_) api_->ctxSetCurrent(previous_);
}

TableBuffer::~TableBuffer() {
    const CudaApi* api = device_->api;
    ScopedContext scope(api, device_->context);
    if (event_ != nullptr) {
        api->eventSynchronize(event_);
        api->eventDestroy(event_);
    }
    if (dev_ != 0) api->memFree(dev_);
    if (host_ != nullptr) api->memFreeHost(host_);
}

bool TableBuffer::idle() const {
    return !recorded_ || device_->api->eventQuery(event_) != CUDA_ERROR_NOT_READY;
}

Result<RunEntry*> TableBuffer::reserve(uint64_t entries) {
    const CudaApi* api = device_->api;
    if (event_ == nullptr) {
        const CUresult r = api->eventCreate(&event_, kEventDisableTiming);
        if (r != CUDA_SUCCESS) return api->error("cuEventCreate", r);
    }
    if (entries <= capacity_) return host_;
    if (recorded_) api->eventSynchronize(event_);
    if (dev_ != 0) api->memFree(dev_);
    if (host_ != nullptr) api->memFreeHost(host_);
    dev_ = 0;
    host_ = nullptr;
    capacity_ = 0;
    const uint64_t want = std::max<uint64_t>(entries + entries / 4, 4096);
    void* h = nullptr;
    CUresult r = api->memHostAlloc(&h, want * sizeof(RunEntry), kMemHostAllocPortable);
    if (r != CUDA_SUCCESS) return api->error("cuMemHostAlloc of a run table", r);
    host_ = static_cast<RunEntry*>(h);
    r = api->memAlloc(&dev_, want * sizeof(RunEntry));
    if (r != CUDA_SUCCESS) return api->error("cuMemAlloc of a run table", r);
    capacity_ = want;
    return host_;
}

Status TableBuffer::launch(uint64_t count, CUstream stream) {
    const CudaApi* api = device_->api;
    if (count > 0) {
        const CUresult r = api->memcpyHtoDAsync(dev_, host_, count * sizeof(RunEntry), stream);
        if (r != CUDA_SUCCESS) return api->error("uploading a run table (cuMemcpyHtoDAsync)", r);
        KVXFER_RETURN_IF_ERROR(device_->launch(dev_, count, 0, 0, false, stream));
    }
    const CUresult r = api->eventRecord(event_, stream);
    if (r != CUDA_SUCCESS) return api->error("cuEventRecord", r);
    recorded_ = true;
    return Status::ok();
}

Status TableBuffer::launchPlanes(uint64_t nruns, uint64_t nplanes, CUstream stream) {
    const CudaApi* api = device_->api;
    const uint64_t count = nruns + nplanes;
    CUresult r = api->memcpyHtoDAsync(dev_, host_, count * sizeof(RunEntry), stream);
    if (r != CUDA_SUCCESS) return api->error("uploading a run table (cuMemcpyHtoDAsync)", r);
    KVXFER_RETURN_IF_ERROR(device_->launchPlanes(dev_, nruns, nplanes, stream));
    r = api->eventRecord(event_, stream);
    if (r != CUDA_SUCCESS) return api->error("cuEventRecord", r);
    recorded_ = true;
    return Status::ok();
}

Result<std::unique_ptr<CopyPlan>> CopyPlan::create(int device, const std::vector<RunEntry>& runs) {
    KVXFER_ASSIGN_OR_RETURN(DeviceState * d, DeviceState::get(device));
    std::unique_ptr<CopyPlan> plan(new CopyPlan());
    plan->device_ = d;
    plan->runs_ = runs.size();
    uint64_t entries = 0;
    for (const RunEntry& r : runs) {
        if (r.src + r.len < r.src || r.dst + r.len < r.dst) {
            return Status::outOfRange("a run's offset + length overflows 64 bits");
        }
        entries += entriesFor(r.len);
        plan->bytes_ += r.len;
        plan->src_extent_ = std::max(plan->src_extent_, r.src + r.len);
        plan->dst_extent_ = std::max(plan->dst_extent_, r.dst + r.len);
    }
    std::vector<RunEntry> table(entries);
    size_t n = 0;
    for (const RunEntry& r : runs) n += appendRun(table.data() + n, r.src, r.dst, r.len);
    plan->entries_ = n;
    if (n == 0) return plan;
    const CudaApi* api = d->api;
    ScopedContext scope(api, d->context);
    KVXFER_RETURN_IF_ERROR(scope.status());
    CUresult r = api->memAlloc(&plan->table_, n * sizeof(RunEntry));
    if (r != CUDA_SUCCESS) return api->error("cuMemAlloc of a copy plan's table", r);
    CUstream stream = nullptr;
    r = api->streamCreate(&stream, kStreamNonBlocking);
    if (r != CUDA_SUCCESS) return api->error("cuStreamCreate", r);
    r = api->memcpyHtoDAsync(plan->table_, table.data(), n * sizeof(RunEntry), stream);
    if (r == CUDA_SUCCESS) r = api->streamSynchronize(stream);
    api->streamDestroy(stream);
    if (r != CUDA_SUCCESS) return api->error("uploading a copy plan's table", r);
    return plan;
}

CopyPlan::~CopyPlan() {
    if (table_ == 0) return;
    const CudaApi* api = device_->api;
    ScopedContext scope(api, device_->context);
    // Launches still queued on the caller's streams may read the table.
    api->ctxSynchronize();
    api->memFree(table_);
}

Status CopyPlan::launch(uint64_t src, uint64_t src_bytes, uint64_t dst, uint64_t dst_bytes, bool swap,
                        uint64_t stream) const {
    const uint64_t need_src = swap ? dst_extent_ : src_extent_;
    const uint64_t need_dst = swap ? src_extent_ : dst_extent_;
    if (src_bytes < need_src) {
        return Status::outOfRange("copy plan reads up to byte " + std::to_string(need_src) +
                                  " of a source of " + std::to_string(src_bytes) + " bytes");
    }
    if (dst_bytes < need_dst) {
        return Status::outOfRange("copy plan writes up to byte " + std::to_string(need_dst) +
                                  " of a destination of " + std::to_string(dst_bytes) + " bytes");
    }
    if (entries_ == 0) return Status::ok();
    const CudaApi* api = device_->api;
    ScopedContext scope(api, device_->context);
    KVXFER_RETURN_IF_ERROR(scope.status());
    return device_->launch(table_, entries_, src, dst, swap, reinterpret_cast<CUstream>(stream));
}

}  // namespace kvxfer::cuda
