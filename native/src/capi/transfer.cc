// The C ABI's transfers and notifications: kvxfer_part -> TransferRequest, the
// transfer handle, and keyed notification waits over the engine's single queue.
#include <algorithm>
#include <thread>

#include "handles.h"

namespace kvxfer::capi {
namespace {

using std::chrono::milliseconds;

Status makeSide(const kvxfer_side& s, const char* which, TransferSide& out) {
    const std::string w(which);
    if (s.reserved != 0) return Status::invalidArgument(w + ".reserved must be 0");
    if (s.kind == KVXFER_SIDE_BLOCKS) {
        if (s.block_ids == nullptr && s.num_block_ids > 0) {
            return Status::invalidArgument(w + ".block_ids is NULL but num_block_ids > 0");
        }
        if (s.extents != nullptr || s.num_extents != 0) {
            return Status::invalidArgument(w + ": a block side must not give extents");
        }
        BlockSide b;
        b.block_ids = std::span<const int64_t>(s.block_ids, s.num_block_ids);
        if (s.layer_end != 0 || s.layer_begin != 0) {
            if (s.layer_end <= s.layer_begin) {
                return Status::outOfRange(w + " layers [" + std::to_string(s.layer_begin) + ", " +
                                          std::to_string(s.layer_end) + ") is empty");
            }
            b.layer_begin = s.layer_begin;
            b.layer_end = s.layer_end;
        }
        out = b;
        return Status::ok();
    }
    if (s.kind == KVXFER_SIDE_EXTENTS) {
        if (s.extents == nullptr && s.num_extents > 0) {
            return Status::invalidArgument(w + ".extents is NULL but num_extents > 0");
        }
        if (s.block_ids != nullptr || s.num_block_ids != 0 || s.layer_begin != 0 || s.layer_end != 0) {
            return Status::invalidArgument(w + ": an extent side must not give block ids or layers");
        }
        static_assert(sizeof(kvxfer_extent) == sizeof(Extent) && alignof(kvxfer_extent) == alignof(Extent));
        out = ExtentSide{std::span<const Extent>(reinterpret_cast<const Extent*>(s.extents), s.num_extents)};
        return Status::ok();
    }
    return Status::invalidArgument(w + ".kind " + std::to_string(s.kind) +
                                   " is neither KVXFER_SIDE_BLOCKS nor KVXFER_SIDE_EXTENTS");
}

// Moves what the core has received into the handle's inbox and takes the oldest entry
// matching `key` (any when key is null).
bool takeMatching(kvxfer_engine& e, const uint8_t* key, size_t key_len, Notification& out) {
    auto fresh = e.engine->takeNotifications();
    std::lock_guard<std::mutex> lock(e.inbox_mutex);
    for (auto& n : fresh) e.inbox.push_back(std::move(n));
    for (auto it = e.inbox.begin(); it != e.inbox.end(); ++it) {
        if (key == nullptr ||
            (it->payload.size() == key_len && std::equal(it->payload.begin(), it->payload.end(), key))) {
            out = std::move(*it);
            e.inbox.erase(it);
            return true;
        }
    }
    return false;
}

struct NoteStorage {
    std::string peer;
    Bytes payload;
};

}  // namespace
}  // namespace kvxfer::capi

using namespace kvxfer;
using namespace kvxfer::capi;

extern "C" {

kvxfer_status kvxfer_post(kvxfer_engine* engine, kvxfer_peer* peer, int32_t op, const kvxfer_part* parts,
                          size_t num_parts, const uint8_t* notify, size_t notify_len, int64_t timeout_ms,
                          uint32_t flags, kvxfer_transfer** out) {
    return guarded([&] {
        KVXFER_CAPI_OUT(out);
        *out = nullptr;
        KVXFER_CAPI_HANDLE(e, engines, engine, "kvxfer_engine");
        KVXFER_CAPI_HANDLE(p, peers, peer, "kvxfer_peer");
        if (op != KVXFER_OP_WRITE && op != KVXFER_OP_READ) {
            return fail(KVXFER_INVALID_ARGUMENT,
                        "op " + std::to_string(op) + " is neither WRITE (0) nor READ (1)");
        }
        if (parts == nullptr && num_parts > 0)
            return fail(KVXFER_INVALID_ARGUMENT, "parts is NULL but num_parts > 0");
        if (notify == nullptr && notify_len > 0) {
            return fail(KVXFER_INVALID_ARGUMENT, "notify is NULL but notify_len > 0");
        }
        if (timeout_ms < 0) return fail(KVXFER_INVALID_ARGUMENT, "timeout_ms must be >= 0 (0 = the default)");
        if ((flags & ~KVXFER_POST_NO_COALESCE) != 0) {
            return fail(KVXFER_INVALID_ARGUMENT, "unknown flags " + std::to_string(flags));
        }
        TransferRequest req;
        req.op = op == KVXFER_OP_WRITE ? Op::kWrite : Op::kRead;
        req.peer = p->peer;
        req.parts.reserve(num_parts);
        // Keeps the region handles alive while the request is built and posted.
        std::vector<std::shared_ptr<kvxfer_region>> held;
        held.reserve(num_parts);
        for (size_t i = 0; i < num_parts; ++i) {
            const kvxfer_part& cp = parts[i];
            const std::string where = "parts[" + std::to_string(i) + "]";
            auto r = regions().find(cp.local);
            if (!r) return badHandle(("kvxfer_region of " + where).c_str(), cp.local);
            if (cp.reserved != 0) return fail(KVXFER_INVALID_ARGUMENT, where + ".reserved must be 0");
            TransferPart part;
            part.local = r->region;
            part.remote_region = cp.remote_region;
            if (Status st = makeSide(cp.local_side, (where + ".local_side").c_str(), part.local_side);
                !st.isOk())
                return fromStatus(st);
            if (Status st = makeSide(cp.remote_side, (where + ".remote_side").c_str(), part.remote_side);
                !st.isOk())
                return fromStatus(st);
            req.parts.push_back(std::move(part));
            held.push_back(std::move(r));
        }
        if (notify_len > 0) req.notify.assign(notify, notify + notify_len);
        req.timeout = std::chrono::milliseconds(timeout_ms);
        req.coalesce = (flags & KVXFER_POST_NO_COALESCE) == 0;
        auto t = e->engine->post(req);
        if (!t.isOk()) return fromStatus(t.status());
        auto h = std::make_shared<kvxfer_transfer>();
        h->transfer = std::move(t).value();
        h->owner = e->engine.get();
        *out = transfers().add(std::move(h));
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_transfer_wait(kvxfer_transfer* transfer, int64_t timeout_ms) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(t, transfers, transfer, "kvxfer_transfer");
        const Clock::time_point until =
            timeout_ms < 0 ? Clock::time_point::max() : Clock::now() + std::chrono::milliseconds(timeout_ms);
        // The transfer's own deadline bounds an unbounded wait.
        const TransferState s = t->transfer.wait(timeout_ms < 0 ? t->transfer.deadline() : until);
        if (s == TransferState::kPending) {
            if (timeout_ms >= 0) return KVXFER_PENDING;
            // At its deadline the timer fails it; wait for that verdict.
            const TransferState again = t->transfer.wait(Clock::now() + std::chrono::seconds(5));
            if (again == TransferState::kPending) {
                return fail(KVXFER_INTERNAL, "transfer " + std::to_string(t->transfer.id()) +
                                                 " is still pending 5 s after its deadline");
            }
        }
        return fromStatus(t->transfer.status());
    });
}

kvxfer_status kvxfer_transfer_state(kvxfer_transfer* transfer, int32_t* state) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(t, transfers, transfer, "kvxfer_transfer");
        KVXFER_CAPI_OUT(state);
        *state = static_cast<int32_t>(t->transfer.state());
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_transfer_cancel(kvxfer_transfer* transfer, int32_t* canceled) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(t, transfers, transfer, "kvxfer_transfer");
        const bool ended = t->transfer.cancel();
        if (canceled != nullptr) *canceled = ended ? 1 : 0;
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_transfer_id(kvxfer_transfer* transfer, uint64_t* id) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(t, transfers, transfer, "kvxfer_transfer");
        KVXFER_CAPI_OUT(id);
        *id = t->transfer.id();
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_transfer_bytes(kvxfer_transfer* transfer, uint64_t* bytes) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(t, transfers, transfer, "kvxfer_transfer");
        KVXFER_CAPI_OUT(bytes);
        *bytes = t->transfer.plan().bytes;
        return KVXFER_OK;
    });
}

kvxfer_status kvxfer_transfer_release(kvxfer_transfer* transfer) {
    return guarded(
        [&] { return transfers().remove(transfer) ? KVXFER_OK : badHandle("kvxfer_transfer", transfer); });
}

kvxfer_status kvxfer_notify(kvxfer_engine* engine, kvxfer_peer* peer, const uint8_t* payload, size_t len,
                            int64_t timeout_ms) {
    return guarded([&] {
        KVXFER_CAPI_HANDLE(e, engines, engine, "kvxfer_engine");
        KVXFER_CAPI_HANDLE(p, peers, peer, "kvxfer_peer");
        if (payload == nullptr && len > 0)
            return fail(KVXFER_INVALID_ARGUMENT, "payload is NULL but len > 0");
        if (timeout_ms < 0) return fail(KVXFER_INVALID_ARGUMENT, "timeout_ms must be >= 0 (0 = the default)");
        return fromStatus(
            e->engine->notify(*p->peer, ByteView(payload, len), std::chrono::milliseconds(timeout_ms)));
    });
}

kvxfer_status kvxfer_wait_notification(kvxfer_engine* engine, const uint8_t* key, size_t key_len,
                                       int64_t timeout_ms, kvxfer_notification* out) {
    return guarded([&] {
        KVXFER_CAPI_OUT(out);
        *out = kvxfer_notification{};
        KVXFER_CAPI_HANDLE(e, engines, engine, "kvxfer_engine");
        if (timeout_ms < 0) return fail(KVXFER_INVALID_ARGUMENT, "timeout_ms must be >= 0");
        if (key == nullptr && key_len > 0)
            return fail(KVXFER_INVALID_ARGUMENT, "key is NULL but key_len > 0");
        const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
        Notification n;
        while (!takeMatching(*e, key, key_len, n)) {
            const auto now = Clock::now();
            if (now >= deadline) return KVXFER_PENDING;
            // The core wakes on any arrival; another thread may take it into the inbox
            // first, so wake in short slices to look there too.
            e->engine->waitNotification(std::min(deadline, now + std::chrono::milliseconds(5)));
        }
        auto* storage = new NoteStorage{std::move(n.peer_name), std::move(n.payload)};
        out->peer_name = storage->peer.c_str();
        out->peer_instance = n.peer_instance;
        out->payload = storage->payload.data();
        out->payload_len = storage->payload.size();
        out->internal_ = storage;
        return KVXFER_OK;
    });
}

void kvxfer_notification_free(kvxfer_notification* note) {
    if (note == nullptr || note->internal_ == nullptr) return;
    delete static_cast<NoteStorage*>(note->internal_);
    *note = kvxfer_notification{};
}

}  // extern "C"
