#include "backends/cuda_ipc/ipc_mapping.h"

#include <cstring>
#include <map>
#include <mutex>
#include <string>

namespace kvxfer::cudaipc {
namespace {

struct Key {
    int device;
    std::string handle;
    bool operator<(const Key& o) const { return device != o.device ? device < o.device : handle < o.handle; }
};

std::mutex& cacheMutex() {
    static std::mutex m;
    return m;
}
std::map<Key, std::weak_ptr<IpcMapping>>& cache() {
    static auto* c = new std::map<Key, std::weak_ptr<IpcMapping>>();  // outlives static teardown
    return *c;
}

}  // namespace

Result<std::shared_ptr<IpcMapping>> IpcMapping::open(cuda::DeviceState* device,
                                                     const cuda::CUipcMemHandle& handle) {
    Key key{device->ordinal, std::string(handle.reserved, sizeof(handle.reserved))};
    std::lock_guard<std::mutex> lock(cacheMutex());
    auto& slot = cache()[key];
    if (auto existing = slot.lock()) return existing;
    const cuda::CudaApi* api = device->api;
    cuda::ScopedContext scope(api, device->context);
    KVXFER_RETURN_IF_ERROR(scope.status());
    cuda::CUdeviceptr ptr = 0;
    const cuda::CUresult r = api->ipcOpenMemHandle(&ptr, handle, cuda::kIpcMemLazyEnablePeerAccess);
    if (r != cuda::CUDA_SUCCESS) {
        cache().erase(key);
        Status st = api->error("cuIpcOpenMemHandle on cuda:" + std::to_string(device->ordinal), r);
        if (r == 217 || r == 1 || r == 201 || r == 801) {
            return Status::unsupported(
                st.message() +
                " (this GPU cannot map the peer's memory: no peer access between the two "
                "GPUs, or the peer's memory is not exportable by legacy CUDA IPC)");
        }
        return st;
    }
    auto m = std::shared_ptr<IpcMapping>(new IpcMapping());
    m->device_ = device;
    m->base_ = ptr;
    slot = m;
    return m;
}

IpcMapping::~IpcMapping() {
    // Closed under the cache lock, so a concurrent open() of the same handle cannot find
    // it still open in this context.
    std::lock_guard<std::mutex> lock(cacheMutex());
    const cuda::CudaApi* api = device_->api;
    {
        cuda::ScopedContext scope(api, device_->context);
        api->ipcCloseMemHandle(base_);
    }
    for (auto it = cache().begin(); it != cache().end();) {
        it = it->second.expired() ? cache().erase(it) : std::next(it);
    }
}

}  // namespace kvxfer::cudaipc
