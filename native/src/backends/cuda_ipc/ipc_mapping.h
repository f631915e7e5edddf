// Process-wide cache of opened CUDA IPC handles.
//
// Legacy CUDA IPC exports a whole allocation (cudaMalloc segment), and a handle may be
// opened only once per context: torch's caching allocator puts many tensors (regions) in
// one segment, so every import of the same allocation shares one mapping, per local
// device, closed when the last import using it goes.
#pragma once

#include <cstdint>
#include <memory>

#include "cuda/copy.h"

namespace kvxfer::cudaipc {

class IpcMapping {
public:
    ~IpcMapping();
    // The allocation's base in this process.
    uint64_t base() const { return base_; }
    // Opens (or shares) `handle` in the context of `device`.
    static Result<std::shared_ptr<IpcMapping>> open(cuda::DeviceState* device,
                                                    const cuda::CUipcMemHandle& handle);

private:
    cuda::DeviceState* device_ = nullptr;
    uint64_t base_ = 0;
};

}  // namespace kvxfer::cudaipc
