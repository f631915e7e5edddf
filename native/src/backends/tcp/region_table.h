// TCP backend, target side: the table of ranges registered with this backend, which every
// inbound WRITE and READ_REQ run is checked against (descriptors are not trusted), and the
// pins that keep a range registered while bytes move into or out of it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace kvxfer::tcp {

struct RegionEntry {
    uint64_t tag = 0;  // random per registration: what a peer names (a stale tag reaches nothing)
    uint64_t base = 0;
    uint64_t length = 0;
    std::atomic<bool> alive{true};
    uint32_t pins = 0;  // guarded by RegionTable::mutex_
};

// Every range registered with this backend, by tag. A receiver pins the entries a frame
// touches while it moves bytes; removing (deregister, close, drop) waits for the pins (a
// pinning thread notices `alive` turning false within one poll slice and lets go).
class RegionTable {
public:
    std::shared_ptr<RegionEntry> add(uint64_t tag, uint64_t base, uint64_t length) {
        auto e = std::make_shared<RegionEntry>();
        e->tag = tag;
        e->base = base;
        e->length = length;
        std::lock_guard<std::mutex> lock(mutex_);
        entries_[tag] = e;
        return e;
    }
    // Idempotent: after it returns no byte moves into or out of the entry's range.
    void remove(const std::shared_ptr<RegionEntry>& e) {
        std::unique_lock<std::mutex> lock(mutex_);
        e->alive.store(false, std::memory_order_release);
        cv_.wait(lock, [&] { return e->pins == 0; });
        if (auto it = entries_.find(e->tag); it != entries_.end() && it->second == e) entries_.erase(it);
    }
    // The live entry `tag` when it contains [addr, addr + len), pinned; null otherwise.
    std::shared_ptr<RegionEntry> pin(uint64_t tag, uint64_t addr, uint64_t len) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = entries_.find(tag);
        if (it == entries_.end()) return nullptr;
        const auto& e = it->second;
        if (!contains(*e, addr, len) || !e->alive.load(std::memory_order_acquire)) return nullptr;
        ++e->pins;
        return e;
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
    std::unordered_map<uint64_t, std::shared_ptr<RegionEntry>> entries_;
};

// The entries pinned for one frame.
class Pins {
public:
    explicit Pins(RegionTable& table) : table_(table) {}
    ~Pins() { release(); }
    bool pin(uint64_t tag, uint64_t addr, uint64_t len) {
        for (const auto& e : held_) {
            if (e->tag == tag && RegionTable::contains(*e, addr, len)) return true;
        }
        auto e = table_.pin(tag, addr, len);
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

}  // namespace kvxfer::tcp
