// GPU helpers of the public API: is CUDA usable here, which GPU holds a pointer, and copy
// plans (paged blocks <-> a contiguous buffer, or any run table) that run as one kernel
// launch on a caller's CUDA stream. The CUDA driver is loaded at run time; without it
// every call returns kUnsupported with the reason.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "kvxfer/status.h"

namespace kvxfer {

// OK when the CUDA driver loads and sees a GPU; otherwise why not.
Status cudaStatus();
// The CUDA ordinal of the device holding `ptr`; kInvalidArgument if it is not device memory.
Result<int> cudaPointerDevice(uint64_t ptr);

// One copy: `length` bytes from `src` to `dst` (offsets into the buffers given at launch).
struct GpuRun {
    uint64_t src;
    uint64_t dst;
    uint64_t length;
};

// A run table uploaded once to one GPU. launch() enqueues one kernel on `stream` (a
// CUstream / cudaStream_t; 0 = the legacy default stream) and returns at once; it checks
// both buffers hold every byte the table names. `swap` copies the other way (dst offsets
// read from `src`, written at src offsets of `dst`): unpack with a pack's plan.
// Thread-safe; the plan must outlive the launches using it (destruction waits for the GPU).
class GpuCopyPlan {
public:
    virtual ~GpuCopyPlan() = default;
    virtual Status launch(uint64_t src, uint64_t src_bytes, uint64_t dst, uint64_t dst_bytes, bool swap,
                          uint64_t stream) const = 0;
    virtual int device() const = 0;
    virtual uint64_t bytes() const = 0;
    virtual uint64_t runs() const = 0;
    virtual uint64_t kernelEntries() const = 0;  // runs cut into the kernel's work units
};

Result<std::shared_ptr<GpuCopyPlan>> makeGpuCopyPlan(int device, std::span<const GpuRun> runs);

}  // namespace kvxfer
