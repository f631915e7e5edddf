// ibverbs backend: a peer connection's queue pairs. Creating them, moving one to RTR/RTS
// against the peer's, the QP-number table, replacing failed ones (repair), and the death
// of a connection.
#include "backends/ibverbs/shared.h"

namespace kvxfer::ib {

// Builds an RC QP in INIT for a new connection (control thread).
Result<std::unique_ptr<QueuePair>> Shared::newRcQp() {
    QueuePair::RcCaps caps;
    caps.send_depth = t_.sq_depth;
    caps.max_send_sge = 1;
    caps.max_inline = 128;
    KVXFER_ASSIGN_OR_RETURN(auto qp, QueuePair::createRc(device_, cq_->cq(), srq_->srq(), caps));
    KVXFER_RETURN_IF_ERROR(qp->toInit(MemoryRegion::kRemoteAccess));
    return qp;
}

void Shared::registerConnection(const std::shared_ptr<Connection>& conn) {
    if (conn->initiator) {
        initiated_[conn->id] = conn;
    } else {
        accepted_[{conn->peer_instance, conn->id}] = conn;
    }
    for (auto& s : conn->slots) {
        if (s.qp) by_qpn_[s.qp->qpn()] = {conn.get(), &s};
    }
    conn->registered = true;
}

void Shared::unregisterConnection(Connection& conn) {
    for (auto& s : conn.slots) {
        if (s.qp) by_qpn_.erase(s.qp->qpn());
        s.qp.reset();
    }
    ready_queue_.erase(std::remove(ready_queue_.begin(), ready_queue_.end(), &conn), ready_queue_.end());
    conn.in_ready = false;
    conn.registered = false;
}

Status Shared::connectSlot(Connection& conn, Slot& slot, const QpEndpoint& remote) {
    RcPath path;
    path.remote_qpn = remote.qpn;
    path.remote_psn = remote.psn;
    path.mtu = conn.mtu;
    path.remote_gid = conn.remote.gid;
    path.remote_lid = conn.remote.lid;
    path.max_dest_rd_atomic = responder_rd_atomic_;
    path.min_rnr_timer = t_.min_rnr_timer;
    path.traffic_class = t_.traffic_class;
    path.service_level = t_.service_level;
    KVXFER_RETURN_IF_ERROR(slot.qp->toRtr(path));
    RcTiming timing = t_.timing;
    timing.max_rd_atomic = std::min(initiator_rd_atomic_, conn.remote_rd_atomic);
    KVXFER_RETURN_IF_ERROR(slot.qp->toRts(timing));
    slot.remote_qpn = remote.qpn;
    slot.remote_psn = remote.psn;
    slot.window = SendWindow(slot.qp->sendDepth(), t_.signal_interval);
    slot.state = SlotState::kReady;
    slot.error = Status::ok();
    slot.remote_fault = false;
    return Status::ok();
}

void Shared::startRepair(Connection& conn) {
    bool any = false;
    for (auto& s : conn.slots) {
        if (s.state != SlotState::kBroken) continue;
        if (s.qp) by_qpn_.erase(s.qp->qpn());
        s.qp.reset();
        QueuePair::RcCaps caps;
        caps.send_depth = t_.sq_depth;
        caps.max_send_sge = 1;
        auto qp = QueuePair::createRc(device_, cq_->cq(), srq_->srq(), caps);
        if (qp.isOk() && (*qp)->toInit(MemoryRegion::kRemoteAccess).isOk()) {
            s.qp = std::move(qp).value();
            s.window = SendWindow(s.qp->sendDepth(), t_.signal_interval);
            s.state = SlotState::kRepairing;
            by_qpn_[s.qp->qpn()] = {&conn, &s};
            any = true;
        } else {
            s.state = SlotState::kDead;
        }
    }
    if (!any) {
        bool ready = false;
        for (auto& s : conn.slots) ready |= s.state == SlotState::kReady || s.state == SlotState::kRepairing;
        if (!ready) {
            connectionDead(conn,
                           Status::peerUnreachable("ibverbs: every queue pair to peer '" + conn.peer_name +
                                                   "' failed and could not be replaced"));
        }
        return;
    }
    ++conn.generation;
    debugLog("peer '%s': repairing queue pairs (generation %u)", conn.peer_name.c_str(), conn.generation);
    newHandshake(conn);  // a repair proves the secret again, over fresh nonces
    conn.handshaking = true;
    conn.handshake_deadline = Clock::now() + t_.repair_timeout;
    conn.handshake_interval = 100ms;
    conn.handshake_next = Clock::now() + conn.handshake_interval;
    sendRequest(conn);
}

void Shared::connectionDead(Connection& conn, Status st) {
    if (conn.state == ConnState::kDead) return;
    debugLog("peer '%s': connection dead: %s", conn.peer_name.c_str(), st.toString().c_str());
    conn.state = ConnState::kDead;
    conn.handshaking = false;
    conn.markDead(st);
    for (auto& s : conn.slots) {
        if (s.state == SlotState::kReady || s.state == SlotState::kIdle || s.state == SlotState::kRepairing ||
            s.state == SlotState::kBroken) {
            if (s.state == SlotState::kReady && s.qp) (void)s.qp->toError();
            if (s.window.empty()) {
                s.state = SlotState::kDead;
            } else {
                s.state = SlotState::kFailed;
                if (s.error.isOk()) s.error = st;
            }
        }
    }
    // Queued work cannot go anywhere: fail it once its outstanding WRs retire.
    std::vector<Work*> queued(conn.queue.begin(), conn.queue.end());
    conn.queue.clear();
    for (Work* w : queued) {
        w->queued = false;
        w->redo.clear();
        w->stopped = true;
        if (w->error.isOk()) w->error = st;
        if (w->phase == Work::Phase::kNotifyQueued) w->phase = Work::Phase::kNotifyPosted;
        advance(*w);
    }
}

}  // namespace kvxfer::ib
