#include "kvxfer/host_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <map>
#include <mutex>

namespace kvxfer {
namespace {

std::mutex g_mutex;
// base address -> (size, fd) of every live HostBuffer.
std::map<uintptr_t, std::pair<uint64_t, int>>& registry() {
    static auto* r = new std::map<uintptr_t, std::pair<uint64_t, int>>();
    return *r;
}

}  // namespace

Result<std::shared_ptr<HostBuffer>> HostBuffer::allocate(uint64_t nbytes) {
    if (nbytes == 0) return Status::invalidArgument("cannot allocate an empty host buffer");
    const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    const uint64_t mapped = (nbytes + page - 1) / page * page;
    std::shared_ptr<HostBuffer> buf(new HostBuffer());
    buf->fd_ = ::memfd_create("kvxfer-host", MFD_CLOEXEC);
    if (buf->fd_ < 0) return Status::systemErrno("memfd_create", errno);
    if (::ftruncate(buf->fd_, static_cast<off_t>(mapped)) != 0) {
        return Status::systemErrno("ftruncate of a " + std::to_string(mapped) + "-byte memfd", errno);
    }
    void* p = ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, buf->fd_, 0);
    if (p == MAP_FAILED)
        return Status::systemErrno("mmap of a " + std::to_string(mapped) + "-byte memfd", errno);
    ::madvise(p, mapped, MADV_HUGEPAGE);  // honoured where shmem THP is enabled
    buf->data_ = static_cast<uint8_t*>(p);
    buf->size_ = nbytes;
    buf->mapped_ = mapped;
    std::lock_guard<std::mutex> lock(g_mutex);
    registry()[reinterpret_cast<uintptr_t>(p)] = {mapped, buf->fd_};
    return buf;
}

HostBuffer::~HostBuffer() {
    if (data_ != nullptr) {
        {
            std::lock_guard<std::mutex> lock(g_mutex);
            registry().erase(reinterpret_cast<uintptr_t>(data_));
        }
        ::munmap(data_, mapped_);
    }
    if (fd_ >= 0) ::close(fd_);
}

std::optional<ShareableRange> findShareableRange(const void* base, uint64_t length) {
    const auto addr = reinterpret_cast<uintptr_t>(base);
    std::lock_guard<std::mutex> lock(g_mutex);
    auto& r = registry();
    auto it = r.upper_bound(addr);
    if (it == r.begin()) return std::nullopt;
    --it;
    const auto [size, fd] = it->second;
    if (addr + length > it->first + size) return std::nullopt;
    return ShareableRange{fd, addr - it->first};
}

}  // namespace kvxfer
