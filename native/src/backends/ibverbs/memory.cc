#include "backends/ibverbs/memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "cuda/copy.h"
#include "cuda/driver.h"

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
    return std::unique_ptr<MemoryRegion>(
        new MemoryRegion(std::move(device), mr, reinterpret_cast<uint64_t>(addr)));
}

Result<std::unique_ptr<MemoryRegion>> MemoryRegion::createGpu(std::shared_ptr<Device> device, void* addr,
                                                              uint64_t length, int access, int cuda_device) {
    KVXFER_ASSIGN_OR_RETURN(
        GpuRegistration reg,
        registerGpuMemory(gpuRegistrationSteps(*device, cuda_device), addr, length, access,
                          device->name() + ", CUDA device " + std::to_string(cuda_device)));
    return std::unique_ptr<MemoryRegion>(
        new MemoryRegion(std::move(device), reg.mr, reinterpret_cast<uint64_t>(addr)));
}

Result<GpuRegistration> registerGpuMemory(const GpuRegistrationSteps& steps, void* addr, uint64_t length,
                                          int access, const std::string& where) {
    const uint64_t va = reinterpret_cast<uint64_t>(addr);
    const uint64_t page = steps.page_bytes;
    const uint64_t base = va & ~(page - 1);
    const uint64_t end = (va + length + page - 1) & ~(page - 1);
    std::string dmabuf_why;
    if (!steps.reg_dmabuf_mr) {
        dmabuf_why = "libibverbs lacks ibv_reg_dmabuf_mr (rdma-core older than 34)";
    } else if (!steps.export_dmabuf) {
        dmabuf_why = "the CUDA driver lacks cuMemGetHandleForAddressRange (older than CUDA 11.7)";
    } else {
        Result<int> fd = steps.export_dmabuf(base, end - base);
        if (!fd.isOk()) {
            dmabuf_why = "the CUDA driver exports no dma-buf for it: " + fd.status().message();
        } else {
            ibv_mr* mr = steps.reg_dmabuf_mr(va - base, length, va, *fd, access);
            const int err = errno;
            steps.close_fd(*fd);  // the MR holds its own reference to the dma-buf
            if (mr != nullptr) return GpuRegistration{mr, "dma-buf"};
            dmabuf_why =
                std::string("ibv_reg_dmabuf_mr failed: ") + std::strerror(err) +
                (err == EOPNOTSUPP || err == EPROTONOSUPPORT ? " (this NIC's driver has no dma-buf support)"
                                                             : "");
        }
    }
    std::string peer_why;
    if (!steps.reg_mr) {
        peer_why = "no ibv_reg_mr";
    } else {
        ibv_mr* mr = steps.reg_mr(addr, length, access);
        if (mr != nullptr) return GpuRegistration{mr, "peer memory"};
        const int err = errno;
        peer_why = std::string("ibv_reg_mr of the device pointer failed: ") + std::strerror(err) +
                   (err == EFAULT ? " (nvidia-peermem is not loaded?)" : "");
    }
    return Status::unsupported("ibverbs cannot register " + std::to_string(length) +
                               " bytes of GPU memory on " + where + ": dma-buf: " + dmabuf_why +
                               "; peer memory: " + peer_why +
                               " (GPUDirect RDMA needs a dma-buf capable stack - Linux >= 5.12, CUDA >= 11.7 "
                               "with the open GPU kernel modules, rdma-core >= 34 - or nvidia-peermem)");
}

GpuRegistrationSteps gpuRegistrationSteps(const Device& device, int cuda_device) {
    GpuRegistrationSteps s;
    const VerbsApi& verbs = device.verbs();
    ibv_pd* pd = device.pd();
    s.page_bytes = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    s.close_fd = [](int fd) { return ::close(fd); };
    s.reg_mr = [&verbs, pd](void* addr, size_t length, int access) {
        return verbs.reg_mr(pd, addr, length, access);
    };
    if (verbs.reg_dmabuf_mr != nullptr) {
        s.reg_dmabuf_mr = [&verbs, pd](uint64_t offset, size_t length, uint64_t iova, int fd, int access) {
            return verbs.reg_dmabuf_mr(pd, offset, length, iova, fd, access);
        };
    }
    auto api = cuda::loadCuda();
    if (api.isOk() && (*api)->memGetHandleForAddressRange != nullptr) {
        const cuda::CudaApi* a = *api;
        s.export_dmabuf = [a, cuda_device](uint64_t base, uint64_t bytes) -> Result<int> {
            cuda::CUdevice dev = 0;
            cuda::CUresult r = a->deviceGet(&dev, cuda_device);
            if (r != cuda::CUDA_SUCCESS)
                return a->error("cuDeviceGet(" + std::to_string(cuda_device) + ")", r);
            cuda::CUcontext ctx = nullptr;
            r = a->primaryCtxRetain(&ctx, dev);
            if (r != cuda::CUDA_SUCCESS) return a->error("cuDevicePrimaryCtxRetain", r);
            int fd = -1;
            {
                cuda::ScopedContext scope(a, ctx);
                if (!scope.status().isOk()) {
                    a->primaryCtxRelease(dev);
                    return scope.status();
                }
                r = a->memGetHandleForAddressRange(&fd, base, bytes, cuda::kMemRangeHandleTypeDmaBufFd, 0);
            }
            a->primaryCtxRelease(dev);
            if (r != cuda::CUDA_SUCCESS) return a->error("cuMemGetHandleForAddressRange(DMA_BUF_FD)", r);
            return fd;
        };
    }
    return s;
}

Status gpuDirectAvailability(const VerbsApi& verbs) {
    const char* env = std::getenv("KVXFER_IBVERBS_GPUDIRECT");
    if (env != nullptr && std::strcmp(env, "0") == 0)
        return Status::unsupported("off (KVXFER_IBVERBS_GPUDIRECT=0)");
    auto api = cuda::loadCuda();
    if (!api.isOk()) return Status::unsupported("no CUDA driver");
    const bool dmabuf = (*api)->memGetHandleForAddressRange != nullptr && verbs.reg_dmabuf_mr != nullptr;
    const bool peermem =
        ::access("/sys/module/nvidia_peermem", F_OK) == 0 || ::access("/sys/module/nv_peer_mem", F_OK) == 0;
    if (!dmabuf && !peermem) {
        return Status::unsupported(verbs.reg_dmabuf_mr == nullptr
                                       ? "no ibv_reg_dmabuf_mr in libibverbs and no nvidia-peermem"
                                       : "no dma-buf export in the CUDA driver and no nvidia-peermem");
    }
    return Status::ok();
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
