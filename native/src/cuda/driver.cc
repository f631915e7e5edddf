#include "cuda/driver.h"

#include <dlfcn.h>

namespace kvxfer::cuda {
namespace {

template <typename Fn>
void bind(void* handle, Fn& slot, const char* name, std::string* missing) {
    slot = reinterpret_cast<Fn>(::dlsym(handle, name));
    if (slot == nullptr && missing != nullptr) {
        if (!missing->empty()) *missing += ", ";
        *missing += name;
    }
}

struct Loaded {
    CudaApi api;
    Status status;
    int devices = 0;
};

Loaded load() {
    Loaded out;
    ::dlerror();
    void* handle = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
        const char* err = ::dlerror();
        out.status = Status::unsupported(std::string("the CUDA driver (libcuda.so.1) cannot be loaded: ") +
                                         (err ? err : "unknown error") +
                                         "; CUDA memory needs an NVIDIA GPU and its driver on this host");
        return out;
    }
    CudaApi& a = out.api;
    std::string missing;
    bind(handle, a.init, "cuInit", &missing);
    bind(handle, a.driverGetVersion, "cuDriverGetVersion", &missing);
    bind(handle, a.getErrorName, "cuGetErrorName", &missing);
    bind(handle, a.getErrorString, "cuGetErrorString", &missing);
    bind(handle, a.deviceGet, "cuDeviceGet", &missing);
    bind(handle, a.deviceGetCount, "cuDeviceGetCount", &missing);
    bind(handle, a.deviceGetName, "cuDeviceGetName", &missing);
    bind(handle, a.deviceGetAttribute, "cuDeviceGetAttribute", &missing);
    bind(handle, a.deviceGetPCIBusId, "cuDeviceGetPCIBusId", &missing);
    bind(handle, a.deviceGetByPCIBusId, "cuDeviceGetByPCIBusId", &missing);
    bind(handle, a.deviceCanAccessPeer, "cuDeviceCanAccessPeer", &missing);
    bind(handle, a.primaryCtxRetain, "cuDevicePrimaryCtxRetain", &missing);
    bind(handle, a.primaryCtxRelease, "cuDevicePrimaryCtxRelease_v2", &missing);
    bind(handle, a.ctxSetCurrent, "cuCtxSetCurrent", &missing);
    bind(handle, a.ctxGetCurrent, "cuCtxGetCurrent", &missing);
    bind(handle, a.ctxSynchronize, "cuCtxSynchronize", &missing);
    bind(handle, a.ctxEnablePeerAccess, "cuCtxEnablePeerAccess", &missing);
    bind(handle, a.pointerGetAttribute, "cuPointerGetAttribute", &missing);
    bind(handle, a.memGetAddressRange, "cuMemGetAddressRange_v2", &missing);
    bind(handle, a.memAlloc, "cuMemAlloc_v2", &missing);
    bind(handle, a.memFree, "cuMemFree_v2", &missing);
    bind(handle, a.memHostAlloc, "cuMemHostAlloc", &missing);
    bind(handle, a.memFreeHost, "cuMemFreeHost", &missing);
    bind(handle, a.memcpyHtoDAsync, "cuMemcpyHtoDAsync_v2", &missing);
    bind(handle, a.memcpyDtoDAsync, "cuMemcpyDtoDAsync_v2", &missing);
    bind(handle, a.ipcGetMemHandle, "cuIpcGetMemHandle", &missing);
    bind(handle, a.ipcOpenMemHandle, "cuIpcOpenMemHandle_v2", &missing);
    bind(handle, a.ipcCloseMemHandle, "cuIpcCloseMemHandle", &missing);
    bind(handle, a.moduleLoadData, "cuModuleLoadData", &missing);
    bind(handle, a.moduleUnload, "cuModuleUnload", &missing);
    bind(handle, a.moduleGetFunction, "cuModuleGetFunction", &missing);
    bind(handle, a.launchKernel, "cuLaunchKernel", &missing);
    bind(handle, a.streamCreate, "cuStreamCreate", &missing);
    bind(handle, a.streamDestroy, "cuStreamDestroy_v2", &missing);
    bind(handle, a.streamWaitEvent, "cuStreamWaitEvent", &missing);
    bind(handle, a.streamSynchronize, "cuStreamSynchronize", &missing);
    bind(handle, a.eventCreate, "cuEventCreate", &missing);
    bind(handle, a.eventDestroy, "cuEventDestroy_v2", &missing);
    bind(handle, a.eventRecord, "cuEventRecord", &missing);
    bind(handle, a.eventQuery, "cuEventQuery", &missing);
    bind(handle, a.eventSynchronize, "cuEventSynchronize", &missing);
    bind(handle, a.memGetHandleForAddressRange, "cuMemGetHandleForAddressRange", nullptr);  // optional
    if (!missing.empty()) {
        out.status = Status::unsupported("the CUDA driver (libcuda.so.1) lacks " + missing +
                                         ": it is too old for kvxfer (CUDA 11.0 or newer is needed)");
        return out;
    }
    const CUresult r = a.init(0);
    if (r != CUDA_SUCCESS) {
        out.status = a.error("cuInit", r);
        out.status = Status::unsupported(out.status.message() + " (no usable GPU, or a driver problem)");
        return out;
    }
    if (a.deviceGetCount(&out.devices) != CUDA_SUCCESS || out.devices == 0) {
        out.status = Status::unsupported("the CUDA driver loads but sees no GPU");
    }
    return out;
}

const Loaded& loaded() {
    static const Loaded l = load();
    return l;
}

}  // namespace

Status CudaApi::error(const std::string& what, CUresult result) const {
    const char* name = nullptr;
    const char* text = nullptr;
    if (getErrorName != nullptr) getErrorName(result, &name);
    if (getErrorString != nullptr) getErrorString(result, &text);
    std::string msg = what + " failed: " + (name ? name : ("CUresult " + std::to_string(result))) +
                      (text ? std::string(" (") + text + ")" : "");
    // Errors that mean "not possible on this machine", not "something broke".
    switch (result) {
        case 100:  // CUDA_ERROR_NO_DEVICE
        case 217:  // CUDA_ERROR_PEER_ACCESS_UNSUPPORTED
        case 801:  // CUDA_ERROR_NOT_SUPPORTED
        case 222:  // CUDA_ERROR_UNSUPPORTED_PTX_VERSION
        case 218:  // CUDA_ERROR_INVALID_PTX
            return Status::unsupported(msg);
        default:
            return Status::system(msg);
    }
}

Result<const CudaApi*> loadCuda() {
    const Loaded& l = loaded();
    if (!l.status.isOk()) return l.status;
    return &l.api;
}

Status cudaAvailability() { return loaded().status; }

Result<int> pointerDevice(uint64_t ptr) {
    KVXFER_ASSIGN_OR_RETURN(const CudaApi* api, loadCuda());
    unsigned memory_type = 0;
    CUresult r = api->pointerGetAttribute(&memory_type, kPointerAttrMemoryType, ptr);
    if (r != CUDA_SUCCESS || memory_type != kMemoryTypeDevice) {
        return Status::invalidArgument("address " + std::to_string(ptr) +
                                       " is not CUDA device memory (the driver does not know it as such)");
    }
    int ordinal = -1;
    r = api->pointerGetAttribute(&ordinal, kPointerAttrDeviceOrdinal, ptr);
    if (r != CUDA_SUCCESS) return api->error("cuPointerGetAttribute(DEVICE_ORDINAL)", r);
    return ordinal;
}

}  // namespace kvxfer::cuda
