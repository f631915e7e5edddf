// ibverbs backend: completions. Polls the one CQ and dispatches by work-request kind:
// RC sends retire their window (a flush or error fails the slot, which is then repaired;
// innocent runs flushed by another's remote fault are posted again), SRQ receives deliver
// notifications, UD receives go to the connection manager.
#include <string>

#include "backends/ibverbs/shared.h"

namespace kvxfer::ib {

// ================================================================================================
// completions

int Shared::pollCompletions() {
    ibv_wc wc[32];
    int total = 0;
    for (int round = 0; round < 16; ++round) {
        const int n = cq_->poll(wc, 32);
        if (n < 0) {
            // The CQ is unusable (device gone): nothing more will complete.
            if (!deviceDead()) {
                {
                    std::lock_guard<std::mutex> lock(mutex_);
                    device_dead_status_ = Status::system("ibv_poll_cq failed on " + device_->name() +
                                                         ": the device is no longer usable");
                }
                device_dead_.store(true);
                failEverything(deviceDeadStatus());
            }
            return total;
        }
        for (int i = 0; i < n; ++i) onCompletion(wc[i]);
        total += n;
        if (n < 32) break;
    }
    return total;
}

void Shared::onCompletion(const ibv_wc& wc) {
    switch (wrKind(wc.wr_id)) {
        case WrKind::kRcSend:
            onRcSendCompletion(wc);
            break;
        case WrKind::kSrqRecv:
            onSrqReceive(wc);
            break;
        case WrKind::kUdRecv:
            onUdReceive(wc);
            break;
        case WrKind::kUdSend:
            free_ud_send_.push_back(static_cast<int>(wrValue(wc.wr_id)));
            break;
    }
}

void Shared::retireOk(Slot& slot, uint64_t upto) {
    std::vector<Work*> touched;
    slot.window.retire(upto, [&](void* owner, uint64_t, uint32_t n) {
        auto* w = static_cast<Work*>(owner);
        w->outstanding -= n;
        send_in_flight_ -= n;
        touched.push_back(w);
    });
    for (Work* w : touched) advance(*w);
}

void Shared::retireFlushed(Slot& slot, uint64_t upto) {
    std::vector<Work*> touched;
    slot.window.retire(upto, [&](void* owner, uint64_t unit, uint32_t n) {
        auto* w = static_cast<Work*>(owner);
        w->outstanding -= n;
        send_in_flight_ -= n;
        touched.push_back(w);
        if (w->phase == Work::Phase::kFinished) return;
        const bool redo = unit != kNotifyUnit && slot.remote_fault && w->error.isOk() && !w->stopped &&
                          w->phase == Work::Phase::kData;
        if (redo) {
            w->redo.emplace_back(unit, unit + n);  // another work's fault broke the QP: post again
            debugLog("re-posting %u flushed runs of an innocent transfer", n);
            enqueueWork(*w);
        } else if (w->error.isOk()) {
            w->error = slot.error;
        }
    });
    for (Work* w : touched) advance(*w);
}

void Shared::onRcSendCompletion(const ibv_wc& wc) {
    auto it = by_qpn_.find(wc.qp_num);
    if (it == by_qpn_.end()) return;
    Connection& conn = *it->second.first;
    Slot& slot = *it->second.second;
    const uint64_t seq = wrValue(wc.wr_id);
    if (!slot.window.contains(seq)) return;
    const bool healthy = slot.state == SlotState::kReady;
    if (wc.status == IBV_WC_SUCCESS) {
        if (healthy) {
            retireOk(slot, seq);
        } else {
            retireFlushed(slot, seq);
        }
    } else if (wc.status == IBV_WC_WR_FLUSH_ERR) {
        if (healthy) {
            Status st =
                portIsDown()
                    ? Status::peerUnreachable("ibverbs: port " + std::to_string(device_->port()) + " of " +
                                              device_->name() + " went down; work requests were flushed")
                    : Status::peerUnreachable("ibverbs: QP 0x" + hex(wc.qp_num) + " to peer '" +
                                              conn.peer_name + "' entered the error state (flushed)");
            failSlot(conn, slot, st, false);
        }
        retireFlushed(slot, seq);
    } else {
        // A real error at `seq`: everything before it completed; it failed.
        if (seq > slot.window.oldest()) {
            if (healthy) {
                retireOk(slot, seq - 1);
            } else {
                retireFlushed(slot, seq - 1);
            }
        }
        auto* owner = static_cast<Work*>(slot.window.ownerOf(seq));
        std::string what = "ibverbs ";
        if (owner != nullptr && owner->phase == Work::Phase::kNotifyPosted) {
            what += "notification SEND";
        } else if (owner != nullptr && owner->job) {
            what += std::string("RDMA ") + opName(owner->job->op);
        } else {
            what += "work request";
        }
        what += " to peer '" + conn.peer_name + "'";
        Status st = completionError(verbs_, wc, what);
        if (st.code() == StatusCode::kSystem && portIsDown()) {
            st = Status::peerUnreachable(st.message() + " (port " + std::to_string(device_->port()) + " of " +
                                         device_->name() + " is down)");
        }
        const bool remote_fault = isRemoteFault(wc.status);
        if (owner != nullptr && owner->error.isOk()) owner->error = st;
        if (healthy) failSlot(conn, slot, st, remote_fault);
        retireFlushed(slot, seq);
    }
    if (slot.state == SlotState::kFailed && slot.window.empty()) slotDrained(conn, slot);
}

void Shared::failSlot(Connection& conn, Slot& slot, Status st, bool remote_fault) {
    if (slot.state != SlotState::kReady) return;
    debugLog("peer '%s' QP slot %d (qpn 0x%x) failed, %u WRs outstanding: %s", conn.peer_name.c_str(),
             slot.index, slot.qp ? slot.qp->qpn() : 0, slot.window.inFlight(), st.toString().c_str());
    slot.state = SlotState::kFailed;
    slot.error = std::move(st);
    slot.remote_fault = remote_fault;
    if (slot.qp) (void)slot.qp->toError();  // flush the rest promptly
    if (slot.window.empty()) slotDrained(conn, slot);
}

void Shared::slotDrained(Connection& conn, Slot& slot) {
    slot.state = SlotState::kBroken;
    if (conn.released || conn.state == ConnState::kDead) {
        slot.state = SlotState::kDead;
        return;
    }
    // Replace the QP through the connection manager. A dead peer does not answer, and the
    // connection dies after repair_timeout; a live one (remote fault) is usable again.
    startRepair(conn);
}

void Shared::onSrqReceive(const ibv_wc& wc) {
    const uint32_t index = static_cast<uint32_t>(wrValue(wc.wr_id));
    if (index >= t_.recv_buffers) return;
    if (wc.status == IBV_WC_SUCCESS) {
        auto it = by_qpn_.find(wc.qp_num);
        if (it != by_qpn_.end() && !stop_.load(std::memory_order_acquire)) {
            Connection& conn = *it->second.first;
            ByteView msg(recv_slab_->slot(index), wc.byte_len);
            if (auto payload = parseNotify(msg)) {
                // In order, behind any notification already waiting for room.
                held_.push_back(
                    {index, conn.peer_name, conn.peer_instance, static_cast<uint32_t>(payload->size())});
                deliverHeld();
                return;  // deliverHeld re-posts the buffer once the sink took it
            }
        }
    }
    if (!stop_.load(std::memory_order_acquire) && !deviceDead()) (void)postSrqBuffer(index);
}

void Shared::deliverHeld() {
    while (!held_.empty()) {
        const HeldNote& h = held_.front();
        const uint8_t* p = recv_slab_->slot(h.index) + NotifyHeader::kBytes;
        const Status st = sink_->deliver(h.peer_name, h.peer_instance, Bytes(p, p + h.length));
        if (st.code() == StatusCode::kBackPressure) {
            // The engine's queue is full: keep the buffer (the notification is not lost) and
            // wait for room. Once every receive buffer is held, senders' SENDs are not
            // received (RNR, retried) and their transfers end at their deadlines.
            if (!room_armed_) {
                room_armed_ = true;
                std::weak_ptr<Shared> self = weak_from_this();
                sink_->onRoom([self] {
                    if (auto s = self.lock()) {
                        s->room_.store(true, std::memory_order_release);
                        s->wake();
                    }
                });
            }
            return;
        }
        const uint32_t index = h.index;
        held_.pop_front();
        if (!stop_.load(std::memory_order_acquire) && !deviceDead()) (void)postSrqBuffer(index);
    }
}

void Shared::onUdReceive(const ibv_wc& wc) {
    const uint32_t index = static_cast<uint32_t>(wrValue(wc.wr_id));
    if (index >= kUdRecvDepth) return;
    if (wc.status == IBV_WC_SUCCESS && wc.byte_len > kGrhBytes) {
        ByteView msg(ud_slab_->slot(index) + kGrhBytes, wc.byte_len - kGrhBytes);
        if (auto m = decodeCm(msg)) onCm(*m);
    }
    if (!deviceDead()) (void)postUdBuffer(index);
}

}  // namespace kvxfer::ib
