// TCP backend, target side: the table of ranges registered with this backend, which every
// inbound WRITE and READ_REQ run is checked against (descriptors are not trusted), and the
// pins that keep a range registered while bytes move into or out of it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace kvxfer::tcp {

struct RegionEntry {
    uint64_t base = 0;
    uint64_t length = 0;
    std::atomic<bool> alive{true};
    uint32_t pins = 0;  // guarded by RegionTable::mutex_
};

// Every range registered with this backend. A receiver pins the entries a frame touches
// while it moves bytes; unregistering waits for the pins (a pinning thread notices
// `alive` turning false within one poll slice and lets go).
class RegionTable {
public:
    std::shared_ptr<RegionEntry> add(uint64_t base, uint64_t length) {
        auto e = std::make_shared<RegionEntry>();
        e->base = base;
        e->length = length;
        std::lock_guard<std::mutex> lock(mutex_);
        entries_.push_back(e);
        return e;
    }
    void remove(const std::shared_ptr<RegionEntry>& e) {
        std::unique_lock<std::mutex> lock(mutex_);
        e->alive.store(false, std::memory_order_release);
        cv_.wait(lock, [&] { return e->pins == 0; });
        std::erase(entries_, e);
    }
    // The live entry containing [addr, addr + len), pinned; null when there is none.
    std::shared_ptr<RegionEntry> pin(uint64_t addr, uint64_t len) {
        std::lock_guard<std::mutex> lock(mutex_);
        for (const auto& e : entries_) {
            if (contains(*e, addr, len) && e->alive.load(std::memory_order_acquire)) {
                ++e->pins;
                return e;
            }
        }
        return nullptr;
    }
    void unpin(RegionEntry& e) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--e.pins == 0) cv_.notify_all();
    }
    static bool contains(const RegionEntry& e, uint64_t addr, uint64_t len) {
        return addr >= e.base && len <= e.length && addr - e.base <= e.length - len;
    }

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    std::vector<std::shared_ptr<RegionEntry>> entries_;
};

// The entries pinned for one frame.
class Pins {
public:
    explicit Pins(RegionTable& table) : table_(table) {}
    ~Pins() { release(); }
    bool pin(uint64_t addr, uint64_t len) {
        for (const auto& e : held_) {
            if (RegionTable::contains(*e, addr, len)) return true;
        }
        auto e = table_.pin(addr, len);
        if (!e) return false;
        held_.push_back(std::move(e));
        return true;
    }
    bool alive() const {
        for (const auto& e : held_) {
            if (!e->alive.load(std::memory_order_acquire)) return false;
        }
        return true;
    }
    void release() {
        for (const auto& e : held_) table_.unpin(*e);
        held_.clear();
    }

private:
    RegionTable& table_;
    std::vector<std::shared_ptr<RegionEntry>> held_;
};

// Orders an inbound connection against the later ones of the same initiator instance.
// When a dead connection is replaced (reconnect), bytes of abandoned jobs may still sit
// in the old socket's receive queue; they must never land after the new connection has
// delivered newer data. A new HELLO therefore marks every older connection of that
// initiator superseded and waits until none is inside a memory section; a superseded

}  // namespace kvxfer::tcp
