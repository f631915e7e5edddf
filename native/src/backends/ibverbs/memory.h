// memory: memory registration (ibv_mr RAII), the remote key published for a region, and
// registered buffers owned by the backend (receive rings, notification staging).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backends/ibverbs/device.h"
#include "kvxfer/descriptor.h"

namespace kvxfer::ib {

// One ibv_mr. Keeps its device (and so the PD) alive; deregisters on destruction.
class MemoryRegion {
public:
    static constexpr int kRemoteAccess =
        IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;

    static Result<std::unique_ptr<MemoryRegion>> create(std::shared_ptr<Device> device, void* addr,
                                                        uint64_t length, int access);
    // CUDA device memory on GPU `cuda_device` (GPUDirect RDMA): dma-buf first, then peer
    // memory (registerGpuMemory below). The error names why each way failed.
    static Result<std::unique_ptr<MemoryRegion>> createGpu(std::shared_ptr<Device> device, void* addr,
                                                           uint64_t length, int access, int cuda_device);
    ~MemoryRegion();
    MemoryRegion(const MemoryRegion&) = delete;
    MemoryRegion& operator=(const MemoryRegion&) = delete;

    uint32_t lkey() const { return mr_->lkey; }
    uint32_t rkey() const { return mr_->rkey; }
    // The virtual address the keys' range starts at (kept here: a dma-buf MR's mr->addr is
    // the offset into the dma-buf, not the iova).
    uint64_t address() const { return address_; }
    uint64_t length() const { return mr_->length; }

private:
    MemoryRegion(std::shared_ptr<Device> device, ibv_mr* mr, uint64_t address)
        : device_(std::move(device)), mr_(mr), address_(address) {}
    std::shared_ptr<Device> device_;
    ibv_mr* mr_;
    uint64_t address_;
};

// The three ways to register GPU memory, as a seam (the real ones come from
// gpuRegistrationSteps; a unit test supplies fakes). An empty function means "absent".
struct GpuRegistrationSteps {
    // A dma-buf fd for [base, base + bytes) of device memory, both page aligned (the CUDA
    // driver's cuMemGetHandleForAddressRange); the error says why not.
    std::function<Result<int>(uint64_t base, uint64_t bytes)> export_dmabuf;
    // ibv_reg_dmabuf_mr (rdma-core >= 34): nullptr with errno set on failure.
    std::function<ibv_mr*(uint64_t offset, size_t length, uint64_t iova, int fd, int access)> reg_dmabuf_mr;
    // ibv_reg_mr on the device pointer (works where nvidia-peermem is loaded): nullptr + errno.
    std::function<ibv_mr*(void* addr, size_t length, int access)> reg_mr;
    std::function<int(int fd)> close_fd;
    uint64_t page_bytes = 4096;
};

struct GpuRegistration {
    ibv_mr* mr = nullptr;
    const char* path = "";  // "dma-buf" or "peer memory"
};

// Registers [addr, addr + length) of GPU memory: (1) dma-buf of the page-aligned range
// covering it, registered at offset (addr - aligned base) with iova = addr, the fd closed
// once registration returned (the kernel holds its own reference to the dma-buf for the
// MR's life); else (2) ibv_reg_mr on the device pointer; else kUnsupported naming why
// each step failed. No fd stays open on any path. `where` names the device in messages.
Result<GpuRegistration> registerGpuMemory(const GpuRegistrationSteps& steps, void* addr, uint64_t length,
                                          int access, const std::string& where);

// The real steps for `device`'s PD and GPU `cuda_device` (the CUDA driver and libibverbs
// through their run-time loaders).
GpuRegistrationSteps gpuRegistrationSteps(const Device& device, int cuda_device);

// Whether this process can register GPU memory at all (CUDA driver loads, and either
// dma-buf export + ibv_reg_dmabuf_mr exist or nvidia-peermem is loaded); the message says
// which way or why not. $KVXFER_IBVERBS_GPUDIRECT=0 turns it off.
Status gpuDirectAvailability(const VerbsApi& verbs);

// What a region publishes for this backend (RegionDescriptor::remote_keys entry):
// 12 bytes, little-endian: u32 rkey | u64 address (the address the rkey's range starts
// at; remote addresses are address + offset into the region).
struct RemoteKey {
    uint32_t rkey = 0;
    uint64_t address = 0;
};
constexpr size_t kRemoteKeyBytes = 12;
Bytes encodeRemoteKey(const RemoteKey& key);
Result<RemoteKey> decodeRemoteKey(ByteView bytes);

// Page-aligned memory owned by the backend, registered for local access (and remote
// write when `remote_write`), carved into `count` slots of `slot_bytes`.
class RegisteredSlab {
public:
    static Result<std::unique_ptr<RegisteredSlab>> create(std::shared_ptr<Device> device, size_t count,
                                                          size_t slot_bytes, int access);
    ~RegisteredSlab();
    RegisteredSlab(const RegisteredSlab&) = delete;
    RegisteredSlab& operator=(const RegisteredSlab&) = delete;

    uint8_t* slot(size_t i) const { return base_ + i * slot_bytes_; }
    size_t slotBytes() const { return slot_bytes_; }
    size_t count() const { return count_; }
    uint32_t lkey() const { return mr_->lkey(); }

private:
    RegisteredSlab() = default;
    uint8_t* base_ = nullptr;
    size_t bytes_ = 0;
    size_t count_ = 0;
    size_t slot_bytes_ = 0;
    std::unique_ptr<MemoryRegion> mr_;
};

}  // namespace kvxfer::ib
