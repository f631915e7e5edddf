// The C ABI's engine, memory and peer functions: text configuration -> EngineConfig,
// registration, descriptors, peers.
#include <charconv>
#include <map>

#include "handles.h"
#include "kvxfer/host_memory.h"

namespace kvxfer::capi {
namespace {

std::string trim(std::string_view s) {
    const auto b = s.find_first_not_of(" \t\r");
    if (b == std::string_view::npos) return {};
    const auto e = s.find_last_not_of(" \t\r");
    return std::string(s.substr(b, e - b + 1));
}

bool parseMillis(const std::string& s, std::chrono::milliseconds* out) {
    int64_t v = 0;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || end != s.data() + s.size() || v <= 0) return false;
    *out = std::chrono::milliseconds(v);
    return true;
}

Status applyEntry(EngineConfig& c, const std::string& key, const std::string& value) {
    if (key == "name") {
        c.name = value;
    } else if (key == "backends") {
        c.backends.clear();
        size_t start = 0;
        while (start <= value.size()) {
            const size_t comma = std::min(value.find(',', start), value.size());
            std::string b = trim(std::string_view(value).substr(start, comma - start));
            if (!b.empty()) c.backends.push_back(std::move(b));
            start = comma + 1;
        }
    } else if (key == "default_timeout_ms") {
        if (!parseMillis(value, &c.default_timeout))
            return Status::invalidArgument("default_timeout_ms must be a positive integer, got '" + value +
                                           "'");
    } else if (key == "connect_timeout_ms") {
        if (!parseMillis(value, &c.connect_timeout))
            return Status::invalidArgument("connect_timeout_ms must be a positive integer, got '" + value +
                                           "'");
    } else {
        return setBackendField(c, key, value);
    }
    return Status::ok();
}

Status parseConfig(const char* text, EngineConfig& c) {
    if (text == nullptr) return Status::ok();
    const std::string_view all(text);
    // Entries end at newlines; at ';' too when there is no newline (a value that holds
    // ';', like fault.script, needs the newline form).
    const char* separators = all.find('\n') == std::string_view::npos ? ";" : "\n";
    size_t start = 0;
    while (start <= all.size()) {
        size_t end = all.find_first_of(separators, start);
        if (end == std::string_view::npos) end = all.size();
        const std::string entry = trim(all.substr(start, end - start));
        start = end + 1;
        if (entry.empty()) continue;
        const auto eq = entry.find('=');
        if (eq == std::string::npos) {
            return Status::invalidArgument("configuration entry '" + entry + "' is not key=value");
        }
        KVXFER_RETURN_IF_ERROR(applyEntry(c, trim(std::string_view(entry).substr(0, eq)),
                                          trim(std::string_view(entry).substr(eq + 1))));
    }
    return Status::ok();
}

std::string joined(const std::vector<std::string>& items) {
    std::string out;
    for (const auto& s : items) out += (out.empty() ? "" : ",") + s;
    return out;
}

kvxfer_kv_layout toC(const KvLayout& l) {
    return {l.num_layers,   l.num_kv,    l.num_blocks,   l.block_bytes,
            l.block_stride, l.kv_stride, l.layer_stride, l.offset};
}

// Shareable buffers handed out by kvxfer_alloc_shareable, by address. Immortal, like
// the handle tables (errors.cc): never torn down by static destructors at exit.
std::mutex& shareable_mutex = *new std::mutex();
std::map<void*, std::shared_ptr<HostBuffer>>& shareable = *new std::map<void*, std::shared_ptr<HostBuffer>>();

}  // namespace
}  // namespace kvxfer::capi

using namespace kvxfer;
using namespace kvxfer::capi;

extern "C" {

kvxfer_status kvxfer_engine_create(const char* config, kvxfer_engine** out) {
    return guarded([&] {
        KVXFER_CAPI_OUT(out);
        *out = nullptr;
        EngineConfig c;
        if (Status st = parseConfig(config, c); !st.isOk()) return fromStatus(st);
        auto engine = Engine::create(std::move(c));
        if (!engine.isOk()) return fromStatus(engine.status());
        auto h = std::make_shared<kvxfer_engine>();
        h->engine = std::move(engine).value();
        *out = engines().add(std::move(h));
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_engine_close(kvxfer_engine* engine) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(e, engines, engine, "kvxfer_engine");
        e->engine->close();
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_engine_destroy(kvxfer_engine* engine) {
    return guarded([&] {
        auto e = engines().remove(engine);
        if (!e) return badHandle("kvxfer_engine", engine);
        // In-flight transfers end CANCELED; every thread of the engine is joined before close()
        // returns (engine.h), so no kvxfer thread outlives this call. The core's engine object
        // goes with the last handle (or a call still using one, on that caller's thread).
        e->engine->close();
        const Engine* owner = e->engine.get();
        regions().removeOwnedBy(owner);
        peers().removeOwnedBy(owner);
        transfers().removeOwnedBy(owner);
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_engine_name(kvxfer_engine* engine, char* buf, size_t cap, size_t* len) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(e, engines, engine, "kvxfer_engine");
        return copyOut(e->engine->name(), true, buf, cap, len, "the engine name");
    });
}

kvxfer_status kvxfer_engine_backends(kvxfer_engine* engine, char* buf, size_t cap, size_t* len) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(e, engines, engine, "kvxfer_engine");
        return copyOut(joined(e->engine->backendNames()), true, buf, cap, len, "the backend list");
    });
}

kvxfer_status kvxfer_engine_completion_fd(kvxfer_engine* engine, int* fd) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(e, engines, engine, "kvxfer_engine");
        KVXFER_CAPI_OUT(fd);
        *fd = e->engine->completionFd();
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_engine_drain_completion_fd(kvxfer_engine* engine) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(e, engines, engine, "kvxfer_engine");
        (void)e->engine->drainCompletions();  // the C ABI watches no transfers: only clears the fd
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_alloc_shareable(uint64_t nbytes, void** out) {
    return guarded([&] {
        KVXFER_CAPI_OUT(out);
        *out = nullptr;
        if (nbytes == 0) return fail(KVXFER_INVALID_ARGUMENT, "kvxfer_alloc_shareable: nbytes must be > 0");
        auto buf = HostBuffer::allocate(nbytes);
        if (!buf.isOk()) return fromStatus(buf.status());
        void* p = (*buf)->data();
        std::lock_guard<std::mutex> lock(shareable_mutex);
        shareable[p] = std::move(buf).value();
        *out = p;
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_free_shareable(void* ptr) {
    return guarded([&] {
        std::shared_ptr<HostBuffer> buf;
        {
            std::lock_guard<std::mutex> lock(shareable_mutex);
            auto it = shareable.find(ptr);
            if (it == shareable.end()) {
                return fail(KVXFER_BAD_HANDLE,
                            "kvxfer_free_shareable: pointer is not from kvxfer_alloc_shareable");
            }
            buf = std::move(it->second);
            shareable.erase(it);
        }
        return KVXFER_OK;  // unmapped here, once no region holds it
    });
}

kvxfer_status kvxfer_register(kvxfer_engine* engine, void* base, uint64_t nbytes,
                              const kvxfer_kv_layout* layout, kvxfer_region** out) {
    return guarded([&] {
        KVXFER_CAPI_OUT(out);
        *out = nullptr;
        KVXFER_CAPI_HANDLE(e, engines, engine, "kvxfer_engine");
        std::optional<KvLayout> l;
        if (layout != nullptr) {
            l = KvLayout{layout->num_layers,   layout->num_kv,    layout->num_blocks,   layout->block_bytes,
                         layout->block_stride, layout->kv_stride, layout->layer_stride, layout->offset};
        }
        // A shareable buffer stays mapped while a region over it lives.
        std::shared_ptr<void> owner;
        {
            std::lock_guard<std::mutex> lock(shareable_mutex);
            auto it = shareable.upper_bound(base);
            if (it != shareable.begin()) {
                --it;
                auto* b = static_cast<uint8_t*>(it->first);
                if (static_cast<uint8_t*>(base) < b + it->second->size()) owner = it->second;
            }
        }
        MemorySpan span{static_cast<uint8_t*>(base), nbytes, MemoryKind::kHost, -1};
        auto r = e->engine->registerMemory(span, l, std::move(owner));
        if (!r.isOk()) return fromStatus(r.status());
        auto h = std::make_shared<kvxfer_region>();
        h->region = std::move(r).value();
        h->owner = e->engine.get();
        *out = regions().add(std::move(h));
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_deregister(kvxfer_engine* engine, kvxfer_region* region) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(e, engines, engine, "kvxfer_engine");
        KVXFER_CAPI_HANDLE(r, regions, region, "kvxfer_region");
        if (Status st = e->engine->deregisterMemory(*r->region); !st.isOk()) return fromStatus(st);
        regions().remove(region);
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_region_id(kvxfer_region* region, uint32_t* id) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(r, regions, region, "kvxfer_region");
        KVXFER_CAPI_OUT(id);
        *id = r->region->id();
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_engine_descriptor(kvxfer_engine* engine, uint8_t* buf, size_t cap, size_t* len) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(e, engines, engine, "kvxfer_engine");
        const Bytes d = e->engine->descriptor();
        return copyOut(std::string(d.begin(), d.end()), false, buf, cap, len, "the descriptor");
    });
}

kvxfer_status kvxfer_add_peer(kvxfer_engine* engine, const uint8_t* descriptor, size_t len,
                              kvxfer_peer** out) {
    return guarded([&] {
        KVXFER_CAPI_OUT(out);
        *out = nullptr;
        KVXFER_CAPI_HANDLE(e, engines, engine, "kvxfer_engine");
        if (descriptor == nullptr && len > 0) {
            return fail(KVXFER_INVALID_ARGUMENT, "descriptor is NULL but len > 0");
        }
        auto p = e->engine->addPeer(ByteView(descriptor, len));
        if (!p.isOk()) return fromStatus(p.status());
        auto h = std::make_shared<kvxfer_peer>();
        h->peer = std::move(p).value();
        h->owner = e->engine.get();
        *out = peers().add(std::move(h));
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_peer_release(kvxfer_peer* peer) {
    return guarded([&] { return peers().remove(peer) ? KVXFER_OK : badHandle("kvxfer_peer", peer); });
}

kvxfer_status kvxfer_peer_name(kvxfer_peer* peer, char* buf, size_t cap, size_t* len) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(p, peers, peer, "kvxfer_peer");
        return copyOut(p->peer->name(), true, buf, cap, len, "the peer name");
    });
}

kvxfer_status kvxfer_peer_backend(kvxfer_peer* peer, char* buf, size_t cap, size_t* len) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(p, peers, peer, "kvxfer_peer");
        return copyOut(p->peer->backendName(), true, buf, cap, len, "the backend name");
    });
}

kvxfer_status kvxfer_peer_regions(kvxfer_peer* peer, kvxfer_remote_region* out, size_t cap, size_t* count) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(p, peers, peer, "kvxfer_peer");
        KVXFER_CAPI_OUT(count);
        if (out == nullptr && cap > 0) return fail(KVXFER_INVALID_ARGUMENT, "out is NULL but cap > 0");
        const auto d = p->peer->descriptor();
        *count = d->regions.size();
        for (size_t i = 0; i < d->regions.size() && i < cap; ++i) {
            const auto& r = d->regions[i];
            out[i] = kvxfer_remote_region{r.id, r.layout ? 1u : 0u, r.length,
                                          r.layout ? toC(*r.layout) : kvxfer_kv_layout{}};
        }
        return KVXFER_OK;
    });
}

}  // extern "C"
