// Internals of the C ABI (native/include/kvxfer.h): the handle structs, the table of
// live handles that every entry point checks its arguments against, the per-thread last
// error, and the guard that keeps C++ exceptions from crossing into C.
//
// Handles are owned by the table (shared_ptr); a lookup returns a shared_ptr, so a
// handle released by one thread while another uses it stays valid until that use ends.
#pragma once

#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvxfer.h"
#include "kvxfer/engine.h"
#include "kvxfer/transfer.h"

struct kvxfer_engine {
    std::shared_ptr<kvxfer::Engine> engine;
    // Notifications taken from the core and not yet claimed by a keyed waiter.
    std::mutex inbox_mutex;
    std::deque<kvxfer::Notification> inbox;
};

// Region, peer and transfer handles name the engine they came from: destroying the
// engine releases them (kvxfer_engine_destroy).
struct kvxfer_region {
    std::shared_ptr<kvxfer::Region> region;
    const kvxfer::Engine* owner = nullptr;
};

struct kvxfer_peer {
    std::shared_ptr<kvxfer::Peer> peer;
    const kvxfer::Engine* owner = nullptr;
};

struct kvxfer_transfer {
    kvxfer::Transfer transfer;
    const kvxfer::Engine* owner = nullptr;
};

namespace kvxfer::capi {

// Live handles of one type. add() takes ownership and returns the pointer handed to C.
template <typename T>
class HandleTable {
public:
    T* add(std::shared_ptr<T> h) {
        T* raw = h.get();
        std::lock_guard<std::mutex> lock(mutex_);
        live_[raw] = std::move(h);
        return raw;
    }
    std::shared_ptr<T> find(const T* raw) const {
        if (raw == nullptr) return nullptr;
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = live_.find(raw);
        return it == live_.end() ? nullptr : it->second;
    }
    std::shared_ptr<T> remove(const T* raw) {
        if (raw == nullptr) return nullptr;
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = live_.find(raw);
        if (it == live_.end()) return nullptr;
        auto out = std::move(it->second);
        live_.erase(it);
        return out;
    }

    // Removes every handle whose owner is `owner`; the caller drops them (outside the lock).
    std::vector<std::shared_ptr<T>> removeOwnedBy(const Engine* owner) {
        std::vector<std::shared_ptr<T>> out;
        std::lock_guard<std::mutex> lock(mutex_);
        for (auto it = live_.begin(); it != live_.end();) {
            if (it->second->owner == owner) {
                out.push_back(std::move(it->second));
                it = live_.erase(it);
            } else {
                ++it;
            }
        }
        return out;
    }

private:
    mutable std::mutex mutex_;
    std::unordered_map<const T*, std::shared_ptr<T>> live_;
};

HandleTable<kvxfer_engine>& engines();
HandleTable<kvxfer_region>& regions();
HandleTable<kvxfer_peer>& peers();
HandleTable<kvxfer_transfer>& transfers();

// Records `message` as this thread's last error and returns `code`.
kvxfer_status fail(kvxfer_status code, std::string message);
// Maps a core Status to a code (recording its message unless it is OK).
kvxfer_status fromStatus(const Status& status);
kvxfer_status badHandle(const char* type, const void* raw);

// Copies `text` (plus a NUL when `nul`) into a caller's buffer with the ABI's rules.
kvxfer_status copyOut(const std::string& text, bool nul, void* buf, size_t cap, size_t* len,
                      const char* what);

// Runs `body`, turning any escaping C++ exception into KVXFER_INTERNAL / KVXFER_SYSTEM.
template <typename F>
kvxfer_status guarded(F&& body) noexcept {
    try {
        return body();
    } catch (const std::bad_alloc&) {
        return fail(KVXFER_SYSTEM, "out of memory");
    } catch (const std::exception& e) {
        return fail(KVXFER_INTERNAL, std::string("unexpected C++ exception: ") + e.what());
    } catch (...) {
        return fail(KVXFER_INTERNAL, "unexpected C++ exception");
    }
}

}  // namespace kvxfer::capi

// Looks up handle `raw` of table `table` into `var`, or returns KVXFER_BAD_HANDLE.
#define KVXFER_CAPI_HANDLE(var, table, raw, type) \
    auto var = ::kvxfer::capi::table().find(raw); \
    if (!var) return ::kvxfer::capi::badHandle(type, static_cast<const void*>(raw))

// Returns KVXFER_INVALID_ARGUMENT when the out-pointer `p` is NULL.
#define KVXFER_CAPI_OUT(p) \
    if ((p) == nullptr) return ::kvxfer::capi::fail(KVXFER_INVALID_ARGUMENT, #p " must not be NULL")
