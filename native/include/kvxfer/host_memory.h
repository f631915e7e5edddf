// Shareable host memory: page-aligned buffers backed by a memfd, so that a peer process
// on the same host can map them and copy with plain memcpy (the shm backend's fast
// path). Any other host memory still works through cross-memory attach.
//
// Thread contract: allocate/free from any thread; the registry lookup is lock-protected.
// Lifetime: the mapping and the memfd live as long as the HostBuffer; a peer that mapped
// it keeps the pages alive on its side until it unmaps (so a late write lands in pages
// nobody else sees, never in reused memory).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "kvxfer/status.h"

namespace kvxfer {

class HostBuffer {
public:
    static Result<std::shared_ptr<HostBuffer>> allocate(uint64_t nbytes);
    ~HostBuffer();
    HostBuffer(const HostBuffer&) = delete;
    HostBuffer& operator=(const HostBuffer&) = delete;

    uint8_t* data() const { return data_; }
    uint64_t size() const { return size_; }
    int fd() const { return fd_; }

private:
    HostBuffer() = default;
    uint8_t* data_ = nullptr;
    uint64_t size_ = 0;
    uint64_t mapped_ = 0;
    int fd_ = -1;
};

// Where [base, base+length) lies inside a live HostBuffer of this process: its memfd
// and the offset of `base` in it.
struct ShareableRange {
    int fd;
    uint64_t offset;
};
std::optional<ShareableRange> findShareableRange(const void* base, uint64_t length);

}  // namespace kvxfer
