#include "backends/cuda_ipc/ipc_mapping.h"

#include <map>
#include <mutex>

namespace kvxfer::cudaipc {
namespace {

struct Entry {
    cuda::DeviceState* device = nullptr;
    uint64_t base = 0;
    int users = 0;
};

std::mutex& cacheMutex() {
    static std::mutex m;
    return m;
}
// (device, handle bytes) -> open mapping. Never destroyed: imports may outlive statics.
std::map<std::pair<int, std::string>, Entry>& cache() {
    static auto* c = new std::map<std::pair<int, std::string>, Entry>();
    return *c;
}

}  // namespace

Result<std::unique_ptr<IpcMapping>> IpcMapping::open(cuda::DeviceState* device,
                                                     const cuda::CUipcMemHandle& handle) {
    std::unique_ptr<IpcMapping> m(new IpcMapping());
    m->device_ = device->ordinal;
    m->key_.assign(handle.reserved, sizeof(handle.reserved));
    std::lock_guard<std::mutex> lock(cacheMutex());
    auto it = cache().find({m->device_, m->key_});
    if (it == cache().end()) {
        const cuda::CudaApi* api = device->api;
        cuda::ScopedContext scope(api, device->context);
        KVXFER_RETURN_IF_ERROR(scope.status());
        cuda::CUdeviceptr ptr = 0;
        const cuda::CUresult r = api->ipcOpenMemHandle(&ptr, handle, cuda::kIpcMemLazyEnablePeerAccess);
        if (r != cuda::CUDA_SUCCESS) {
            Status st = api->error("cuIpcOpenMemHandle on cuda:" + std::to_string(device->ordinal), r);
            if (r == 217 || r == 1 || r == 201 || r == 801) {
                return Status::unsupported(
                    st.message() +
                    " (this GPU cannot map the peer's memory: no peer access between "
                    "the two GPUs, or the memory is not exportable by legacy CUDA IPC)");
            }
            return st;
        }
        it = cache().emplace(std::make_pair(m->device_, m->key_), Entry{device, ptr, 0}).first;
    }
    ++it->second.users;
    m->base_ = it->second.base;
    return m;
}

IpcMapping::~IpcMapping() {
    std::lock_guard<std::mutex> lock(cacheMutex());
    auto it = cache().find({device_, key_});
    if (it == cache().end() || --it->second.users > 0) return;
    const cuda::CudaApi* api = it->second.device->api;
    {
        cuda::ScopedContext scope(api, it->second.device->context);
        api->ipcCloseMemHandle(it->second.base);
    }
    cache().erase(it);
}

}  // namespace kvxfer::cudaipc
