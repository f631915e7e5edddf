// Process-wide cache of opened CUDA IPC handles.
//
// Legacy CUDA IPC exports a whole allocation (cudaMalloc segment), and a handle may be
// opened only once per context: torch's caching allocator puts many tensors (regions) in
// one segment, so every import of the same allocation shares one mapping per local GPU.
// The cache counts its users under one lock and closes the handle when the last goes, so
// an open() can never meet a handle that is still open but already being released.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "cuda/copy.h"

namespace kvxfer::cudaipc {

class IpcMapping {
public:
    ~IpcMapping();  // releases this user; the last one closes the handle
    IpcMapping(const IpcMapping&) = delete;
    IpcMapping& operator=(const IpcMapping&) = delete;
    // The allocation's base in this process.
    uint64_t base() const { return base_; }
    // Opens (or shares) `handle` in the context of `device`.
    static Result<std::unique_ptr<IpcMapping>> open(cuda::DeviceState* device,
                                                    const cuda::CUipcMemHandle& handle);

private:
    IpcMapping() = default;
    int device_ = -1;
    std::string key_;
    uint64_t base_ = 0;
};

}  // namespace kvxfer::cudaipc
