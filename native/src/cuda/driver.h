// driver: the CUDA driver API, loaded at run time with dlopen("libcuda.so.1").
//
// kvxfer never links libcuda or the CUDA runtime, so `import kvxfer` works on hosts
// without a GPU or driver, and one wheel serves both. The few driver entry points kvxfer
// uses are declared here (own minimal declarations, ABI-compatible with cuda.h) and
// resolved once per process into CudaApi. Versioned entry points are resolved by their
// exported names (cuMemGetAddressRange_v2, cuIpcOpenMemHandle_v2, ...), which is what
// cuda.h's macros name.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "kvxfer/status.h"

namespace kvxfer::cuda {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = struct CUctx_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
using CUstream = struct CUstream_st*;
using CUevent = struct CUevent_st*;
struct CUipcMemHandle {
    char reserved[64];
};

constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_NOT_READY = 600;
constexpr CUresult CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED = 704;
constexpr unsigned kIpcMemLazyEnablePeerAccess = 0x1;
constexpr unsigned kStreamNonBlocking = 0x1;
constexpr unsigned kEventDisableTiming = 0x2;
constexpr unsigned kMemHostAllocPortable = 0x1;
constexpr int kAttrMultiprocessorCount = 16;
constexpr int kAttrPciBusId = 33;
constexpr int kAttrPciDeviceId = 34;
constexpr int kAttrPciDomainId = 50;
constexpr int kPointerAttrContext = 1;
constexpr int kPointerAttrMemoryType = 2;
constexpr int kPointerAttrDeviceOrdinal = 9;
constexpr int kPointerAttrIsLegacyIpcCapable = 10;
constexpr unsigned kMemoryTypeDevice = 2;
constexpr int kMemRangeHandleTypeDmaBufFd = 1;  // CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD

struct CudaApi {
    CUresult (*init)(unsigned flags) = nullptr;
    CUresult (*driverGetVersion)(int* version) = nullptr;
    CUresult (*getErrorName)(CUresult error, const char** str) = nullptr;
    CUresult (*getErrorString)(CUresult error, const char** str) = nullptr;
    CUresult (*deviceGet)(CUdevice* device, int ordinal) = nullptr;
    CUresult (*deviceGetCount)(int* count) = nullptr;
    CUresult (*deviceGetName)(char* name, int len, CUdevice dev) = nullptr;
    CUresult (*deviceGetAttribute)(int* value, int attrib, CUdevice dev) = nullptr;
    CUresult (*deviceGetPCIBusId)(char* bus_id, int len, CUdevice dev) = nullptr;
    CUresult (*deviceGetByPCIBusId)(CUdevice* dev, const char* bus_id) = nullptr;
    CUresult (*deviceCanAccessPeer)(int* can, CUdevice dev, CUdevice peer) = nullptr;
    CUresult (*primaryCtxRetain)(CUcontext* ctx, CUdevice dev) = nullptr;
    CUresult (*primaryCtxRelease)(CUdevice dev) = nullptr;
    CUresult (*ctxSetCurrent)(CUcontext ctx) = nullptr;
    CUresult (*ctxGetCurrent)(CUcontext* ctx) = nullptr;
    CUresult (*ctxSynchronize)() = nullptr;
    CUresult (*ctxEnablePeerAccess)(CUcontext peer, unsigned flags) = nullptr;
    CUresult (*pointerGetAttribute)(void* data, int attribute, CUdeviceptr ptr) = nullptr;
    CUresult (*memGetAddressRange)(CUdeviceptr* base, size_t* size, CUdeviceptr ptr) = nullptr;
    CUresult (*memAlloc)(CUdeviceptr* ptr, size_t bytes) = nullptr;
    CUresult (*memFree)(CUdeviceptr ptr) = nullptr;
    CUresult (*memHostAlloc)(void** ptr, size_t bytes, unsigned flags) = nullptr;
    CUresult (*memFreeHost)(void* ptr) = nullptr;
    CUresult (*memcpyHtoDAsync)(CUdeviceptr dst, const void* src, size_t bytes, CUstream stream) = nullptr;
    CUresult (*memcpyDtoDAsync)(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream stream) = nullptr;
    CUresult (*ipcGetMemHandle)(CUipcMemHandle* handle, CUdeviceptr ptr) = nullptr;
    CUresult (*ipcOpenMemHandle)(CUdeviceptr* ptr, CUipcMemHandle handle, unsigned flags) = nullptr;
    CUresult (*ipcCloseMemHandle)(CUdeviceptr ptr) = nullptr;
    CUresult (*moduleLoadData)(CUmodule* module, const void* image) = nullptr;
    CUresult (*moduleUnload)(CUmodule module) = nullptr;
    CUresult (*moduleGetFunction)(CUfunction* fn, CUmodule module, const char* name) = nullptr;
    CUresult (*launchKernel)(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                             unsigned bz, unsigned shared_bytes, CUstream stream, void** params,
                             void** extra) = nullptr;
    CUresult (*streamCreate)(CUstream* stream, unsigned flags) = nullptr;
    CUresult (*streamDestroy)(CUstream stream) = nullptr;
    CUresult (*streamWaitEvent)(CUstream stream, CUevent event, unsigned flags) = nullptr;
    CUresult (*streamSynchronize)(CUstream stream) = nullptr;
    CUresult (*eventCreate)(CUevent* event, unsigned flags) = nullptr;
    CUresult (*eventDestroy)(CUevent event) = nullptr;
    CUresult (*eventRecord)(CUevent event, CUstream stream) = nullptr;
    CUresult (*eventQuery)(CUevent event) = nullptr;
    CUresult (*eventSynchronize)(CUevent event) = nullptr;
    // Optional (CUDA >= 11.7; nullptr on older drivers): a dma-buf fd for a page-aligned
    // range of device memory (GPUDirect RDMA through ibv_reg_dmabuf_mr).
    CUresult (*memGetHandleForAddressRange)(void* handle, CUdeviceptr ptr, size_t bytes, int handle_type,
                                            unsigned long long flags) = nullptr;

    // "cuXxx failed: CUDA_ERROR_NAME (description)" as a kvxfer Status (kSystem, or
    // kUnsupported for errors that mean "this cannot work here").
    Status error(const std::string& what, CUresult result) const;
};

// Loads libcuda.so.1 and calls cuInit once per process (never unloaded). The error says
// why CUDA cannot be used here: no library (no NVIDIA driver), a missing symbol (too old
// a driver), or cuInit failing (no device, driver/library mismatch).
Result<const CudaApi*> loadCuda();

// OK when the driver loads and sees at least one device; otherwise why not (cheap after
// the first call).
Status cudaAvailability();

// The CUDA device ordinal holding `ptr`, or an error when it is not CUDA device memory.
Result<int> pointerDevice(uint64_t ptr);

}  // namespace kvxfer::cuda
