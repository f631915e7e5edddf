#include "backends/shm/exports.h"

#include <sys/mman.h>

#include <cerrno>
#include <chrono>
#include <thread>

#include "util/auth.h"

namespace kvxfer::shm {

Result<std::shared_ptr<ExportTable>> ExportTable::create() {
    auto t = std::make_shared<ExportTable>();
    t->fd_ = Fd(::memfd_create("kvxfer-shm-exports", MFD_CLOEXEC));
    if (t->fd_.fd < 0) return Status::systemErrno("shm: memfd_create(export table)", errno);
    // Sparse: pages appear as slots are used (64 bytes each).
    if (::ftruncate(t->fd_.fd, static_cast<off_t>(kTableBytes)) != 0) {
        return Status::systemErrno("shm: sizing the export table", errno);
    }
    KVXFER_RETURN_IF_ERROR(t->map_.map(t->fd_.fd));
    t->stuck_.assign(kSlots, false);
    return t;
}

Result<std::pair<uint32_t, uint64_t>> ExportTable::publish(uint32_t kind, uint64_t base, uint64_t length,
                                                           int32_t fd, uint64_t ino, uint64_t offset) {
    uint64_t tag = 0;
    while (tag == 0) KVXFER_RETURN_IF_ERROR(auth::randomBytes(reinterpret_cast<uint8_t*>(&tag), sizeof(tag)));
    uint32_t index = 0;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!free_.empty()) {
            index = free_.back();
            free_.pop_back();
        } else if (next_ < kSlots) {
            index = next_++;
        } else {
            return Status::unsupported("shm: more than " + std::to_string(kSlots) +
                                       " regions registered at once");
        }
    }
    Slot& s = map_.slots[index];
    s.kind = kind;
    s.base = base;
    s.length = length;
    s.fd = fd;
    s.ino = ino;
    s.offset = offset;
    s.tag.store(tag, std::memory_order_seq_cst);  // publishes the fields above
    return std::make_pair(index, tag);
}

void ExportTable::revoke(uint32_t index) {
    Slot& s = map_.slots[index];
    s.tag.store(0, std::memory_order_seq_cst);
    // A chunk is at most 64 MiB of memcpy or one process_vm_writev call: milliseconds.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (s.users.load(std::memory_order_seq_cst) != 0) {
        if (std::chrono::steady_clock::now() > give_up) {
            std::lock_guard<std::mutex> lock(mutex_);
            stuck_[index] = true;
            return;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
}

void ExportTable::release(uint32_t index) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!stuck_[index]) free_.push_back(index);
}

}  // namespace kvxfer::shm
