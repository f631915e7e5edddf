// ibverbs backend: posting. Connections with queued work take turns; a Work's runs go out
// as chains of RDMA WRITE / READ work requests spread over the connection's queue pairs,
// within each send window and the CQ budget; a notification is one SEND from a notify slot.
#include <algorithm>
#include <cstring>

#include "backends/ibverbs/shared.h"

namespace kvxfer::ib {

// ================================================================================================
// posting

Slot* Shared::pickSlot(Connection& conn, bool need_notify) {
    const size_t n = conn.slots.size();
    for (size_t k = 0; k < n; ++k) {
        Slot& s = conn.slots[(conn.next_slot + k) % n];
        if (s.state != SlotState::kReady || s.window.room() == 0) continue;
        (void)need_notify;
        conn.next_slot = (conn.next_slot + k + 1) % n;
        return &s;
    }
    return nullptr;
}

void Shared::postWork() {
    if (deviceDead()) return;
    size_t rounds = ready_queue_.size();
    while (rounds-- > 0 && !ready_queue_.empty()) {
        Connection* c = ready_queue_.front();
        ready_queue_.pop_front();
        c->in_ready = false;
        // Works are freed only at the top of the progress loop, so `w` stays valid here even
        // if it finished meanwhile; the queue itself may change under any call below.
        auto pop = [c](Work* w) {
            if (!c->queue.empty() && c->queue.front() == w) {
                c->queue.pop_front();
                w->queued = false;
            }
        };
        bool blocked = false;
        while (!c->queue.empty() && !blocked) {
            Work* w = c->queue.front();
            if (w->phase == Work::Phase::kData) {
                if (w->job && w->job->abandoned()) w->stopped = true;
                if (!w->stopped && w->error.isOk()) blocked = !postFrom(*c, *w);
                if (!w->dataLeft() || w->stopped || !w->error.isOk()) {
                    pop(w);
                    advance(*w);
                }
            } else if (w->phase == Work::Phase::kNotifyQueued) {
                if (!postNotify(*c, *w)) {
                    blocked = true;
                } else {
                    pop(w);
                    advance(*w);
                }
            } else {
                pop(w);
            }
        }
        if (!c->queue.empty() && !c->in_ready && c->registered) {
            c->in_ready = true;
            ready_queue_.push_back(c);
        }
    }
}

// Posts as much of `w` as windows allow, spreading chains over the connection's QPs.
// False when blocked (no room); true when everything was posted or the work stopped.
bool Shared::postFrom(Connection& conn, Work& w) {
    PostList list;
    const TransferJob& job = *w.job;
    while (w.dataLeft() && !w.stopped && w.error.isOk()) {
        if (send_in_flight_ >= send_budget_) return false;
        Slot* s = pickSlot(conn, false);
        if (s == nullptr) return false;
        // Next contiguous range of units.
        uint64_t first, end;
        if (!w.redo.empty()) {
            first = w.redo.back().first;
            end = w.redo.back().second;
        } else {
            first = w.next;
            end = w.total;
        }
        const uint64_t room =
            std::min<uint64_t>({s->window.room(), t_.chain_max, send_budget_ - send_in_flight_});
        end = std::min(end, first + room);
        list.clear();
        const uint64_t seq0 = s->window.nextSeq();
        Status bad;
        for (uint64_t u = first; u < end; ++u) {
            const FlatRun r = job.run(u);
            if (r.length > max_msg_ || r.length > 0xffffffffu) {
                bad = Status::internal("plan run of " + std::to_string(r.length) +
                                       " bytes exceeds the port's maximum message size");
                end = u;
                break;
            }
            const uint32_t i = static_cast<uint32_t>(u - first);
            const Work::Keys& k = w.keys[r.part];
            list.addRdma(w.opcode, makeWrId(WrKind::kRcSend, seq0 + i), reinterpret_cast<uint64_t>(r.local),
                         static_cast<uint32_t>(r.length), k.lkey, k.remote_base + r.remote_offset, k.rkey,
                         s->window.wantSignal(i));
        }
        if (list.size() > 0) {
            list.signalLast();
            ibv_send_wr* bad_wr = nullptr;
            Status st = s->qp->post(list.link(), &bad_wr);
            size_t posted = list.size();
            if (!st.isOk()) posted = list.indexOf(bad_wr);
            if (posted > 0) {
                // A partial post leaves an unsignaled tail: make it visible by failing the slot,
                // which flushes (and so retires) everything.
                s->window.record(&w, first, static_cast<uint32_t>(posted), 0);
                w.outstanding += posted;
                send_in_flight_ += posted;
            }
            if (!w.redo.empty()) {
                auto& r = w.redo.back();
                r.first += posted;
                if (r.first >= r.second) w.redo.pop_back();
            } else {
                w.next += posted;
            }
            if (!st.isOk()) {
                if (w.error.isOk()) w.error = st;
                w.stopped = true;
                failSlot(conn, *s, st, false);
                return true;
            }
        }
        if (!bad.isOk()) {
            if (w.error.isOk()) w.error = bad;
            w.stopped = true;
            return true;
        }
    }
    return true;
}

bool Shared::postNotify(Connection& conn, Work& w) {
    if (send_in_flight_ >= send_budget_) return false;
    const Bytes& p = w.notifyPayload();
    const uint32_t len = static_cast<uint32_t>(NotifyHeader::kBytes + p.size());
    Slot* s = pickSlot(conn, true);
    if (s == nullptr) return false;
    // A notification that fits inline is copied into the work request by the post itself and
    // holds no buffer afterwards, so it never waits for (or takes) a shared slot: a stopped
    // peer's RNR-waiting SENDs cannot starve anyone's small notifications.
    const bool inline_data = len <= s->qp->maxInline();
    uint8_t inline_buf[NotifyHeader::kBytes + 256];
    uint8_t* buf = inline_buf;
    uint32_t lkey = 0;
    if (!inline_data || len > sizeof(inline_buf)) {
        if (w.notify_slot < 0) {
            // One peer holds at most a quarter of a slab: SENDs to a stopped peer wait in RNR
            // until their transfers' deadlines, and must not starve the other peers' notifications.
            if (conn.notify_held >= std::max<uint32_t>(1, t_.notify_slots / 4)) return false;
            if (free_notify_.empty() && !growNotifySlots().isOk()) return false;
            w.notify_slot = free_notify_.back();
            free_notify_.pop_back();
            ++conn.notify_held;
        }
        buf = notifyBuffer(w.notify_slot);
        lkey = notifyLkey(w.notify_slot);
    }
    // (Re)written on every post: a re-post after a flush sends the same bytes.
    writeNotifyHeader(buf, static_cast<uint32_t>(p.size()));
    if (!p.empty()) std::memcpy(buf + NotifyHeader::kBytes, p.data(), p.size());
    PostList list;
    const uint64_t seq = s->window.nextSeq();
    list.addSend(makeWrId(WrKind::kRcSend, seq), reinterpret_cast<uint64_t>(buf), len, lkey, true,
                 inline_data);
    ibv_send_wr* bad = nullptr;
    Status st = s->qp->post(list.link(), &bad);
    if (!st.isOk()) {
        if (w.error.isOk()) w.error = st;
        w.phase = Work::Phase::kNotifyPosted;  // nothing outstanding: advance() finishes it
        failSlot(conn, *s, st, false);
        return true;
    }
    s->window.record(&w, kNotifyUnit, 1, 0);
    w.outstanding += 1;
    send_in_flight_ += 1;
    w.phase = Work::Phase::kNotifyPosted;
    return true;
}

// Registers one more slab of notification buffers (the progress thread, when every buffer is
// held: typically by SENDs waiting in RNR for stopped peers). Fails at the cap or when the
// registration fails; a notification then waits for a buffer to come back.
Status Shared::growNotifySlots() {
    if (notify_slabs_.size() >= kMaxNotifySlabs) {
        return Status::outOfRange("every ibverbs notification buffer is in use");
    }
    auto slab = RegisteredSlab::create(device_, t_.notify_slots, kNotifyBufferBytes, IBV_ACCESS_LOCAL_WRITE);
    if (!slab.isOk()) return slab.status();
    const int first = static_cast<int>(notify_slabs_.size() * t_.notify_slots);
    notify_slabs_.push_back(std::move(slab).value());
    for (uint32_t i = 0; i < t_.notify_slots; ++i) free_notify_.push_back(first + static_cast<int>(i));
    return Status::ok();
}

}  // namespace kvxfer::ib
