// In-process memory access shared by the loopback and fault backends: a target region is
// "pinned" while a copy into or out of it runs, and its registration waits for running
// copies before it lets the memory go. So dropping or deregistering a region with a
// transfer in flight never frees memory a copy thread still touches.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>

#include "kvxfer/backend.h"

namespace kvxfer {

// Guards one registered region of memory against use after its registration ended.
class RegionPin {
public:
    // True (and counted) while the region is registered; pair with exit().
    bool enter() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (closed_) return false;
        ++active_;
        return true;
    }
    void exit() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--active_ == 0) cv_.notify_all();
    }
    // Refuses new copies and waits for running ones (bounded by one chunk's copy).
    void close() {
        std::unique_lock<std::mutex> lock(mutex_);
        closed_ = true;
        cv_.wait(lock, [&] { return active_ == 0; });
    }

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    int active_ = 0;
    bool closed_ = false;
};

// This process's registration of a region (both ends of an in-process copy hold the pin).
class InProcessRegion final : public BackendRegion {
public:
    InProcessRegion() : pin(std::make_shared<RegionPin>()) {}
    ~InProcessRegion() override { pin->close(); }
    std::shared_ptr<RegionPin> pin;
};

// The initiator's import of a peer region in the same process.
class InProcessRemoteRegion final : public BackendRemoteRegion {
public:
    std::shared_ptr<RegionPin> pin;  // null when the peer region could not be found
};

// Copies runs [first, end) of `job` with memcpy, entering each part's local and remote
// pins first. kRemote when the target region is gone, kCanceled when the local one is.
Status copyInProcess(TransferJob& job, uint64_t first, uint64_t end);

}  // namespace kvxfer
