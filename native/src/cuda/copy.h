// copy: the run-table copy kernel on one GPU, for the cuda_ipc backend and pack/unpack.
//
// DeviceState holds what kvxfer keeps per CUDA device and process: the device's primary
// context (the one the CUDA runtime and torch use), the copy kernel loaded from the
// embedded PTX (kernels/copy_runs.cu), and the SM count that sizes the grid.
// CopyPlan is a run table uploaded once (pack/unpack of a fixed block list); TableBuffer
// is a reusable pinned + device pair for tables built per transfer.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/driver.h"
#include "kvxfer/status.h"

namespace kvxfer::cuda {

// One entry of the kernel's table; layout shared with kernels/copy_runs.cu.
struct RunEntry {
    uint64_t src;
    uint64_t dst;
    uint64_t len;
};

// Longest entry: longer runs are cut so work units stay even across CTAs.
constexpr uint64_t kChunkBytes = 64 * 1024;

// Appends (src, dst, len) cut into entries of at most kChunkBytes; returns entries added.
inline size_t appendRun(RunEntry* out, uint64_t src, uint64_t dst, uint64_t len) {
    size_t n = 0;
    while (len > 0) {
        const uint64_t k = len < kChunkBytes ? len : kChunkBytes;
        out[n++] = {src, dst, k};
        src += k;
        dst += k;
        len -= k;
    }
    return n;
}
inline uint64_t entriesFor(uint64_t len) { return (len + kChunkBytes - 1) / kChunkBytes; }

struct DeviceState {
    const CudaApi* api = nullptr;
    int ordinal = -1;
    CUdevice device = 0;
    CUcontext context = nullptr;
    CUfunction kernel = nullptr;         // flat run table
    CUfunction kernel_planes = nullptr;  // runs x planes
    int sms = 1;
    std::string pci_bus_id;  // "0000:1b:00.0"
    // Launch shape (process-wide tunables, read once from the environment):
    // KVXFER_CUDA_COPY_UNROLL (2, 4 or 8 loads in flight per thread), KVXFER_CUDA_COPY_THREADS
    // (threads per CTA), KVXFER_CUDA_COPY_CTAS_PER_SM.
    unsigned threads = 512;
    unsigned ctas_per_sm = 4;
    int unroll = 4;

    // The state of `ordinal` (created once per process, never destroyed).
    static Result<DeviceState*> get(int ordinal);
    // Launches the kernel over `count` entries at `table` (device memory) on `stream`.
    Status launch(CUdeviceptr table, uint64_t count, uint64_t src_base, uint64_t dst_base, bool swap,
                  CUstream stream) const;
    // Launches the runs x planes kernel: `nruns` run entries (offsets) then `nplanes` plane
    // entries (src, dst bases; len unused) at `table`.
    Status launchPlanes(CUdeviceptr table, uint64_t nruns, uint64_t nplanes, CUstream stream) const;
};

// Makes a context current on this thread for the scope, then restores the previous one
// (so a caller's CUDA runtime keeps its current device).
class ScopedContext {
public:
    ScopedContext(const CudaApi* api, CUcontext ctx);
    ~ScopedContext();
    ScopedContext(const ScopedContext&) = delete;
    ScopedContext& operator=(const ScopedContext&) = delete;
    const Status& status() const { return status_; }

private:
    const CudaApi* api_;
    CUcontext previous_ = nullptr;
    bool restore_ = false;
    Status status_;
};

// A pinned host buffer and a device buffer for one run table, reused once the event
// recorded after its last launch has completed. Used by one thread.
class TableBuffer {
public:
    explicit TableBuffer(DeviceState* device) : device_(device) {}
    ~TableBuffer();
    TableBuffer(const TableBuffer&) = delete;
    TableBuffer& operator=(const TableBuffer&) = delete;
    // Host room for `entries` entries (grows both buffers; never while in flight).
    Result<RunEntry*> reserve(uint64_t entries);
    // Uploads `count` entries on `stream` and launches the kernel (none if 0), then records
    // done() (after whatever was queued on `stream` before, e.g. copy-engine copies).
    Status launch(uint64_t count, CUstream stream);
    // The same for a table of `nruns` run entries followed by `nplanes` plane entries.
    Status launchPlanes(uint64_t nruns, uint64_t nplanes, CUstream stream);
    CUevent done() const { return event_; }
    // True when no launch of this buffer is pending on the GPU.
    bool idle() const;

private:
    DeviceState* device_;
    RunEntry* host_ = nullptr;
    CUdeviceptr dev_ = 0;
    uint64_t capacity_ = 0;
    CUevent event_ = nullptr;
    bool recorded_ = false;
};

// A run table of (source offset, destination offset, length) uploaded once to one GPU;
// launch() copies it between any two buffers it fits, with one kernel launch.
class CopyPlan {
public:
    // `runs` are offsets relative to the buffers given to launch().
    static Result<std::unique_ptr<CopyPlan>> create(int device, const std::vector<RunEntry>& runs);
    ~CopyPlan();
    CopyPlan(const CopyPlan&) = delete;
    CopyPlan& operator=(const CopyPlan&) = delete;

    // Copies every run from src to dst (swap: from dst-column offsets in src to
    // src-column offsets in dst: the inverse copy) on `stream`, asynchronously. Checks
    // both buffers hold every offset the table names.
    Status launch(uint64_t src, uint64_t src_bytes, uint64_t dst, uint64_t dst_bytes, bool swap,
                  uint64_t stream) const;
    int device() const { return device_->ordinal; }
    uint64_t bytes() const { return bytes_; }
    uint64_t runs() const { return runs_; }
    uint64_t entries() const { return entries_; }
    uint64_t srcExtent() const { return src_extent_; }
    uint64_t dstExtent() const { return dst_extent_; }

private:
    CopyPlan() = default;
    DeviceState* device_ = nullptr;
    CUdeviceptr table_ = 0;
    uint64_t entries_ = 0;
    uint64_t runs_ = 0;
    uint64_t bytes_ = 0;
    uint64_t src_extent_ = 0;
    uint64_t dst_extent_ = 0;
};

}  // namespace kvxfer::cuda
