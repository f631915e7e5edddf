#include "backends/ibverbs/memory.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>

namespace kvxfer::ib {

Result<std::unique_ptr<MemoryRegion>> MemoryRegion::create(std::shared_ptr<Device> device, void* addr,
                                                           uint64_t length, int access) {
    ibv_mr* mr = device->verbs().reg_mr(device->pd(), addr, length, access);
    if (mr == nullptr) {
        const int err = errno;
        std::string hint;
        if (err == ENOMEM || err == EAGAIN) {
            hint = " (pinned-memory limit? check `ulimit -l` / LimitMEMLOCK)";
        } else if (err == EFAULT) {
            hint = " (the buffer is not mapped, or is device memory this NIC cannot register)";
        }
        return Status::systemErrno(
            "ibv_reg_mr of " + std::to_string(length) + " bytes on " + device->name() + hint, err);
    }
    return std::unique_ptr<MemoryRegion>(new MemoryRegion(std::move(device), mr));
}

MemoryRegion::~MemoryRegion() { device_->verbs().dereg_mr(mr_); }

Bytes encodeRemoteKey(const RemoteKey& key) {
    Bytes out(kRemoteKeyBytes);
    std::memcpy(out.data(), &key.rkey, 4);
    std::memcpy(out.data() + 4, &key.address, 8);
    return out;
}

Result<RemoteKey> decodeRemoteKey(ByteView bytes) {
    if (bytes.size() != kRemoteKeyBytes) {
        return Status::badDescriptor("ibverbs remote key must be " + std::to_string(kRemoteKeyBytes) +
                                     " bytes (u32 rkey, u64 address), got " + std::to_string(bytes.size()));
    }
    RemoteKey key;
    std::memcpy(&key.rkey, bytes.data(), 4);
    std::memcpy(&key.address, bytes.data() + 4, 8);
    return key;
}

Result<std::unique_ptr<RegisteredSlab>> RegisteredSlab::create(std::shared_ptr<Device> device, size_t count,
                                                               size_t slot_bytes, int access) {
    std::unique_ptr<RegisteredSlab> s(new RegisteredSlab());
    s->count_ = count;
    s->slot_bytes_ = (slot_bytes + 63) & ~size_t{63};
    s->bytes_ = s->count_ * s->slot_bytes_;
    void* p = ::mmap(nullptr, s->bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return Status::systemErrno("mmap of " + std::to_string(s->bytes_) + " bytes", errno);
    s->base_ = static_cast<uint8_t*>(p);
    KVXFER_ASSIGN_OR_RETURN(s->mr_, MemoryRegion::create(std::move(device), s->base_, s->bytes_, access));
    return s;
}

RegisteredSlab::~RegisteredSlab() {
    mr_.reset();  // deregister before unmapping
    if (base_ != nullptr) ::munmap(base_, bytes_);
}

}  // namespace kvxfer::ib
