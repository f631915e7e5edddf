// memory: memory registration (ibv_mr RAII), the remote key published for a region, and
// registered buffers owned by the backend (receive rings, notification staging).
#pragma once

#include <cstdint>
#include <memory>
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
    ~MemoryRegion();
    MemoryRegion(const MemoryRegion&) = delete;
    MemoryRegion& operator=(const MemoryRegion&) = delete;

    uint32_t lkey() const { return mr_->lkey; }
    uint32_t rkey() const { return mr_->rkey; }
    uint64_t address() const { return reinterpret_cast<uint64_t>(mr_->addr); }
    uint64_t length() const { return mr_->length; }

private:
    MemoryRegion(std::shared_ptr<Device> device, ibv_mr* mr) : device_(std::move(device)), mr_(mr) {}
    std::shared_ptr<Device> device_;
    ibv_mr* mr_;
};

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
