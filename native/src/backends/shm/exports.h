// shm backend: the export table, the target's own record of what peers may reach.
//
// A memfd of kSlots fixed-size slots that the target writes and every authenticated peer
// maps (it receives the memfd over the notification socket with SCM_RIGHTS, docs/security.md).
// A registered region owns one slot: a random nonzero tag (the region's generation), how it
// is reached (memfd or cross-memory attach), its address range and, for a memfd, the fd
// number, inode and offset in the target. A region's remote key names only (slot, tag); the
// initiator takes everything else from the table, so a forged or stale descriptor reaches
// nothing the target does not export now.
//
// Fencing, without a round trip per chunk: before a chunk the initiator increments the
// slot's `users` and then reads `tag`; after the chunk it decrements `users`. Revoking
// (deregister, close, drop) stores tag 0 and then waits until `users` is 0. Both sides use
// sequentially consistent operations, so either the initiator sees tag 0 (and moves
// nothing) or the target sees its increment (and waits for the chunk to end).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "kvxfer/status.h"
#include "util/scoped_fd.h"

namespace kvxfer::shm {

struct alignas(64) Slot {
    std::atomic<uint64_t> tag;  // 0: free or revoked
    std::atomic<uint32_t> users;
    uint32_t kind;  // kSlotCma or kSlotMemfd
    uint64_t base;  // the region's address in the target
    uint64_t length;
    int32_t fd;  // memfd: fd number in the target
    uint32_t reserved;
    uint64_t ino;     // memfd: st_ino, checked by the initiator after pidfd_getfd
    uint64_t offset;  // memfd: offset of `base` in it
};
static_assert(sizeof(Slot) == 64);
static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<uint32_t>::is_always_lock_free);

constexpr uint32_t kSlots = 65536;  // PeerDescriptor::kMaxRegions
constexpr size_t kTableBytes = sizeof(Slot) * kSlots;
constexpr uint32_t kSlotCma = 0;
constexpr uint32_t kSlotMemfd = 1;

// A mapping of a table (the target's own, or a peer's).
struct TableMapping {
    Slot* slots = nullptr;
    TableMapping() = default;
    TableMapping(const TableMapping&) = delete;
    TableMapping& operator=(const TableMapping&) = delete;
    ~TableMapping() {
        if (slots != nullptr) ::munmap(slots, kTableBytes);
    }
    Status map(int fd) {
        void* p = ::mmap(nullptr, kTableBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) return Status::systemErrno("shm: mapping the export table", errno);
        slots = static_cast<Slot*>(p);
        return Status::ok();
    }
};

// The target's side: slot allocation and revocation.
class ExportTable {
public:
    static Result<std::shared_ptr<ExportTable>> create();
    int fd() const { return fd_.fd; }
    // A slot for a new registration, its fields set and its fresh tag published.
    Result<std::pair<uint32_t, uint64_t>> publish(uint32_t kind, uint64_t base, uint64_t length, int32_t fd,
                                                  uint64_t ino, uint64_t offset);
    // Ends access to `slot`: after it returns no initiator moves bytes of it (unless one
    // stays inside a chunk for longer than the bound, e.g. a stopped initiator: then the
    // slot is never reused). Idempotent.
    void revoke(uint32_t slot);
    // Returns a revoked slot to the free list.
    void release(uint32_t slot);

private:
    Fd fd_;
    TableMapping map_;
    std::mutex mutex_;
    std::vector<uint32_t> free_;
    std::vector<bool> stuck_;  // revoke gave up waiting: never reuse
    uint32_t next_ = 0;
};

// Initiator side: holds a slot for one chunk if its tag is still `tag`.
class SlotUse {
public:
    SlotUse(Slot& slot, uint64_t tag) : slot_(slot) {
        slot_.users.fetch_add(1, std::memory_order_seq_cst);
        ok_ = slot_.tag.load(std::memory_order_seq_cst) == tag;
    }
    ~SlotUse() { slot_.users.fetch_sub(1, std::memory_order_seq_cst); }
    SlotUse(const SlotUse&) = delete;
    SlotUse& operator=(const SlotUse&) = delete;
    bool ok() const { return ok_; }

private:
    Slot& slot_;
    bool ok_ = false;
};

}  // namespace kvxfer::shm
