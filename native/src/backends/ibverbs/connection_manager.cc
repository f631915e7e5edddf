// ibverbs backend: the connection manager, over the UD queue pair (README.md has the
// messages). The initiator sends CONNECT_REQUEST with its QPs and retries with backoff until
// the reply or the deadline; the target accepts (creates and connects its QPs) or rejects;
// repairs are new requests of a higher generation; DISCONNECT drops the target's side.
#include <algorithm>
#include <cstring>

#include "backends/ibverbs/shared.h"

namespace kvxfer::ib {

// ================================================================================================
// connection manager

void Shared::sendCm(const CmMessage& msg, const ibv_gid& gid, uint16_t lid, uint32_t qpn, uint32_t qkey,
                    ByteView secret, std::string_view label) {
    if (free_ud_send_.empty() || deviceDead()) return;  // a datagram may be lost anyway: callers retry
    const std::string key(reinterpret_cast<const char*>(gid.raw), 16);
    auto& ah = ud_ahs_[{key, lid}];
    if (!ah) {
        auto created = AddressHandle::create(device_, gid, lid);
        if (!created.isOk()) {
            ud_ahs_.erase({key, lid});
            return;
        }
        ah = std::move(created).value();
    }
    const Bytes bytes = encodeCm(msg, secret, label);
    const int slot = free_ud_send_.back();
    uint8_t* buf = ud_slab_->slot(static_cast<size_t>(slot));
    std::memcpy(buf, bytes.data(), bytes.size());
    ibv_sge sge{reinterpret_cast<uint64_t>(buf), static_cast<uint32_t>(bytes.size()), ud_slab_->lkey()};
    ibv_send_wr wr{};
    wr.wr_id = makeWrId(WrKind::kUdSend, static_cast<uint64_t>(slot));
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_SEND;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr.ud.ah = ah->ah();
    wr.wr.ud.remote_qpn = qpn;
    wr.wr.ud.remote_qkey = qkey;
    ibv_send_wr* bad = nullptr;
    if (ud_qp_->post(&wr, &bad).isOk()) free_ud_send_.pop_back();
}

CmMessage Shared::requestFor(Connection& conn) const {
    CmMessage m;
    m.type = CmType::kConnectRequest;
    m.conn_id = conn.id;
    m.src_instance = instance_;
    m.dst_instance = conn.peer_instance;
    m.gid = device_->gid();
    m.ud_qpn = ud_qp_->qpn();
    m.qkey = qkey_;
    m.lid = device_->portAttr().lid;
    m.mtu = static_cast<uint8_t>(device_->activeMtu());
    m.rd_atomic = responder_rd_atomic_;
    m.generation = conn.generation;
    for (const auto& s : conn.slots) m.qps.push_back({s.qp ? s.qp->qpn() : 0, s.qp ? s.qp->initialPsn() : 0});
    m.name = name_;
    m.initiator_nonce = conn.initiator_nonce;
    m.target_nonce = conn.target_nonce;  // zero until the target's CHALLENGE
    return m;
}

void Shared::sendRequest(Connection& conn) {
    // The first request of a handshake carries no proof (there is no target nonce yet):
    // it only asks for a CHALLENGE. The next one proves the secret over both nonces.
    sendCm(requestFor(conn), conn.remote.gid, conn.remote.lid, conn.remote.ud_qpn, conn.remote.qkey,
           conn.have_target_nonce ? ByteView(conn.peer_secret) : ByteView(),
           conn.have_target_nonce ? kInitiatorLabel : std::string_view());
}

void Shared::newHandshake(Connection& conn) {
    auto nonce = auth::randomNonce();
    // Without a random nonce the request stays unproven and the handshake times out.
    conn.initiator_nonce = nonce.isOk() ? *nonce : auth::Nonce{};
    conn.target_nonce = {};
    conn.have_target_nonce = false;
}

void Shared::onChallenge(const CmMessage& ch) {
    auto it = initiated_.find(ch.conn_id);
    if (it == initiated_.end()) return;
    Connection& conn = *it->second;
    if (!conn.handshaking || conn.have_target_nonce || ch.src_instance != conn.peer_instance ||
        ch.dst_instance != instance_ ||
        !auth::equal(auth::view(ch.initiator_nonce), auth::view(conn.initiator_nonce))) {
        return;  // stale or foreign
    }
    conn.target_nonce = ch.target_nonce;
    conn.have_target_nonce = true;
    sendRequest(conn);  // now with the proof
    conn.handshake_interval = 100ms;
    conn.handshake_next = Clock::now() + conn.handshake_interval;
}

bool Shared::authenticate(const CmMessage& req) {
    const auto key = std::make_pair(req.src_instance, req.conn_id);
    const auto now = Clock::now();
    const auth::Nonce zero{};
    if (!auth::equal(auth::view(req.target_nonce), auth::view(zero))) {
        // A proof: over the nonces of the connection this request repeats, or of a challenge.
        bool known = false;
        if (auto a = accepted_.find(key);
            a != accepted_.end() &&
            auth::equal(auth::view(a->second->initiator_nonce), auth::view(req.initiator_nonce)) &&
            auth::equal(auth::view(a->second->target_nonce), auth::view(req.target_nonce))) {
            known = true;
        } else if (auto c = challenges_.find(key);
                   c != challenges_.end() && now < c->second.expires &&
                   auth::equal(auth::view(c->second.initiator_nonce), auth::view(req.initiator_nonce)) &&
                   auth::equal(auth::view(c->second.target_nonce), auth::view(req.target_nonce))) {
            known = true;
            challenges_.erase(c);
        }
        if (known) {
            if (verifyCm(req, secret_, kInitiatorLabel)) return true;
            CmMessage m;
            m.type = CmType::kReject;
            m.conn_id = req.conn_id;
            m.src_instance = instance_;
            m.dst_instance = req.src_instance;
            m.reason = RejectReason::kUnauthenticated;
            m.text = "the request did not prove the descriptor's secret";
            sendCm(m, req.gid, req.lid, req.ud_qpn, req.qkey);
            return false;
        }
        // Nonces this engine did not issue (or that expired): a new challenge below.
    }
    auto c = challenges_.find(key);
    if (c == challenges_.end() || now >= c->second.expires ||
        !auth::equal(auth::view(c->second.initiator_nonce), auth::view(req.initiator_nonce))) {
        auto nonce = auth::randomNonce();
        if (!nonce.isOk()) return false;
        if (challenges_.size() >= kMaxChallenges) {
            // Bounded: expired ones go, then the oldest (its initiator gets a new one).
            for (auto i = challenges_.begin(); i != challenges_.end();) {
                i = now >= i->second.expires ? challenges_.erase(i) : std::next(i);
            }
            if (challenges_.size() >= kMaxChallenges) {
                challenges_.erase(
                    std::min_element(challenges_.begin(), challenges_.end(),
                                     [](auto& a, auto& b) { return a.second.expires < b.second.expires; }));
            }
        }
        c = challenges_.insert_or_assign(key, Challenge{req.initiator_nonce, *nonce, now + kChallengeLife})
                .first;
    }
    CmMessage m;
    m.type = CmType::kChallenge;
    m.conn_id = req.conn_id;
    m.src_instance = instance_;
    m.dst_instance = req.src_instance;
    m.initiator_nonce = c->second.initiator_nonce;
    m.target_nonce = c->second.target_nonce;
    sendCm(m, req.gid, req.lid, req.ud_qpn, req.qkey);
    return false;
}

void Shared::startConnect(Command& cmd) {
    auto conn = cmd.conn;
    conn->connect_waiter = cmd.waiter;
    if (deviceDead()) {
        conn->connect_waiter->set(deviceDeadStatus());
        return;
    }
    registerConnection(conn);
    newHandshake(*conn);
    conn->handshaking = true;
    conn->handshake_deadline = cmd.deadline;
    conn->handshake_interval = 100ms;
    conn->handshake_next = Clock::now() + conn->handshake_interval;
    sendRequest(*conn);
}

void Shared::handshakeTimers(Clock::time_point now) {
    std::vector<Connection*> expired;
    for (auto& [id, conn] : initiated_) {
        if (!conn->handshaking) continue;
        if (now >= conn->handshake_deadline) {
            expired.push_back(conn.get());
        } else if (now >= conn->handshake_next) {
            sendRequest(*conn);
            conn->handshake_interval =
                std::min<std::chrono::milliseconds>(conn->handshake_interval * 2, 1000ms);
            conn->handshake_next = now + conn->handshake_interval;
        }
    }
    for (Connection* c : expired) {
        c->handshaking = false;
        const bool first = c->state == ConnState::kConnecting;
        connectFailed(*c, Status::peerUnreachable(
                              std::string("ibverbs: peer '") + c->peer_name + "' did not answer " +
                              (first ? "the connection request" : "the queue-pair repair request") +
                              " (UD QPN 0x" + hex(c->remote.ud_qpn) + " at GID " +
                              gidToString(c->remote.gid) + "); is it running and reachable on this fabric?"));
    }
}

void Shared::connectFailed(Connection& conn, Status st) {
    conn.handshaking = false;
    if (conn.state == ConnState::kConnecting) {
        conn.state = ConnState::kDead;
        conn.markDead(st);
        if (conn.connect_waiter) conn.connect_waiter->set(st);
        conn.connect_waiter.reset();
        // The connect() caller aborts and drops it; its QPs go with the last reference.
        return;
    }
    // A repair failed: the repairing slots are dead.
    bool any = false;
    for (auto& s : conn.slots) {
        if (s.state == SlotState::kRepairing || s.state == SlotState::kBroken) s.state = SlotState::kDead;
        any |= s.state == SlotState::kReady;
    }
    if (!any) connectionDead(conn, st);
}

void Shared::abortConnect(const std::shared_ptr<Connection>& conn) {
    if (conn->registered) {
        if (conn->state == ConnState::kReady) {
            CmMessage m;
            m.type = CmType::kDisconnect;
            m.conn_id = conn->id;
            m.src_instance = instance_;
            m.dst_instance = conn->peer_instance;
            m.initiator_nonce = conn->initiator_nonce;
            m.target_nonce = conn->target_nonce;
            sendCm(m, conn->remote.gid, conn->remote.lid, conn->remote.ud_qpn, conn->remote.qkey,
                   conn->peer_secret, kDisconnectLabel);
        }
        conn->handshaking = false;
        conn->state = ConnState::kDead;
        unregisterConnection(*conn);
        initiated_.erase(conn->id);
    }
}

void Shared::release(const std::shared_ptr<Connection>& conn) {
    conn->released = true;
    if (!conn->registered) return;
    if (conn->state == ConnState::kReady) {
        CmMessage m;
        m.type = CmType::kDisconnect;
        m.conn_id = conn->id;
        m.src_instance = instance_;
        m.dst_instance = conn->peer_instance;
        m.initiator_nonce = conn->initiator_nonce;
        m.target_nonce = conn->target_nonce;
        sendCm(m, conn->remote.gid, conn->remote.lid, conn->remote.ud_qpn, conn->remote.qkey,
               conn->peer_secret, kDisconnectLabel);
    }
    conn->handshaking = false;
    initiated_.erase(conn->id);
    // Standalone notifications may still be in flight: drain before destroying the QPs.
    bool busy = false;
    for (auto& s : conn->slots) {
        if (!s.window.empty()) {
            busy = true;
            if (s.qp && s.state == SlotState::kReady) (void)s.qp->toError();
        }
    }
    if (busy) {
        closing_.push_back(conn);
    } else {
        unregisterConnection(*conn);
    }
}

void Shared::onCm(const CmMessage& msg) {
    switch (msg.type) {
        case CmType::kConnectRequest:
            onConnectRequest(msg);
            break;
        case CmType::kConnectReply:
            onConnectReply(msg);
            break;
        case CmType::kReject:
            onReject(msg);
            break;
        case CmType::kDisconnect:
            onDisconnect(msg);
            break;
        case CmType::kChallenge:
            onChallenge(msg);
            break;
    }
}

void Shared::onConnectRequest(const CmMessage& req) {
    auto reject = [&](RejectReason why, std::string text) {
        CmMessage m;
        m.type = CmType::kReject;
        m.conn_id = req.conn_id;
        m.src_instance = instance_;
        m.dst_instance = req.src_instance;
        m.reason = why;
        m.text = std::move(text);
        sendCm(m, req.gid, req.lid, req.ud_qpn, req.qkey);
    };
    // Names no instance id: a stale descriptor learns nothing from the refusal.
    if (req.dst_instance != instance_) {
        return reject(RejectReason::kWrongInstance,
                      "the descriptor is stale: it names another instance of this engine (it restarted)");
    }
    if (req.mtu < IBV_MTU_256 || req.mtu > IBV_MTU_4096 || req.qps.empty()) {
        return reject(RejectReason::kIncompatible, "bad MTU or queue-pair count");
    }
    if (stop_.load()) return reject(RejectReason::kShuttingDown, "engine '" + name_ + "' is closing");
    // Nothing is created for a request that has not proven the secret.
    if (!authenticate(req)) return;
    const auto key = std::make_pair(req.src_instance, req.conn_id);
    auto it = accepted_.find(key);
    std::shared_ptr<Connection> conn;
    if (it == accepted_.end()) {
        // A peer restarted under the same name: its old connections are dead.
        for (auto i = accepted_.begin(); i != accepted_.end();) {
            if (i->second->peer_name == req.name && i->second->peer_instance != req.src_instance) {
                unregisterConnection(*i->second);
                i = accepted_.erase(i);
            } else {
                ++i;
            }
        }
        conn = std::make_shared<Connection>();
        conn->id = req.conn_id;
        conn->initiator = false;
        conn->peer_name = req.name;
        conn->peer_instance = req.src_instance;
        conn->remote.gid = req.gid;
        conn->remote.lid = req.lid;
        conn->remote.ud_qpn = req.ud_qpn;
        conn->remote.qkey = req.qkey;
        conn->mtu = static_cast<ibv_mtu>(std::min<int>(req.mtu, device_->activeMtu()));
        conn->remote_rd_atomic = std::max<uint8_t>(1, req.rd_atomic);
        conn->generation = req.generation;
        conn->initiator_nonce = req.initiator_nonce;
        conn->target_nonce = req.target_nonce;
        conn->slots.resize(req.qps.size());
        for (size_t i = 0; i < req.qps.size(); ++i) {
            Slot& s = conn->slots[i];
            s.index = static_cast<int>(i);
            auto qp = newRcQp();
            if (!qp.isOk()) return reject(RejectReason::kResources, qp.status().message());
            s.qp = std::move(qp).value();
            Status st = connectSlot(*conn, s, req.qps[i]);
            if (!st.isOk()) return reject(RejectReason::kResources, st.message());
        }
        conn->state = ConnState::kReady;
        registerConnection(conn);
        debugLog("accepted %zu QPs from '%s' (instance %llx)", conn->slots.size(), conn->peer_name.c_str(),
                 static_cast<unsigned long long>(conn->peer_instance));
    } else {
        conn = it->second;
        if (req.generation < conn->generation || req.qps.size() != conn->slots.size())
            return;  // stale duplicate
        if (req.generation > conn->generation) {
            // Repair: replace every QP whose peer QP changed.
            for (size_t i = 0; i < req.qps.size(); ++i) {
                Slot& s = conn->slots[i];
                if (s.remote_qpn == req.qps[i].qpn && s.qp) continue;
                if (s.qp) by_qpn_.erase(s.qp->qpn());
                s.qp.reset();
                auto qp = newRcQp();
                if (!qp.isOk()) return reject(RejectReason::kResources, qp.status().message());
                s.qp = std::move(qp).value();
                Status st = connectSlot(*conn, s, req.qps[i]);
                if (!st.isOk()) return reject(RejectReason::kResources, st.message());
                by_qpn_[s.qp->qpn()] = {conn.get(), &s};
            }
            conn->generation = req.generation;
            conn->initiator_nonce = req.initiator_nonce;
            conn->target_nonce = req.target_nonce;
        }
    }
    CmMessage rep;
    rep.type = CmType::kConnectReply;
    rep.conn_id = conn->id;
    rep.src_instance = instance_;
    rep.dst_instance = conn->peer_instance;
    rep.gid = device_->gid();
    rep.ud_qpn = ud_qp_->qpn();
    rep.qkey = qkey_;
    rep.lid = device_->portAttr().lid;
    rep.mtu = static_cast<uint8_t>(conn->mtu);
    rep.rd_atomic = responder_rd_atomic_;
    rep.generation = conn->generation;
    for (const auto& s : conn->slots) rep.qps.push_back({s.qp->qpn(), s.qp->initialPsn()});
    rep.name = name_;
    rep.initiator_nonce = conn->initiator_nonce;
    rep.target_nonce = conn->target_nonce;
    sendCm(rep, req.gid, req.lid, req.ud_qpn, req.qkey, secret_, kTargetLabel);
}

void Shared::onConnectReply(const CmMessage& rep) {
    auto it = initiated_.find(rep.conn_id);
    if (it == initiated_.end()) return;
    Connection& conn = *it->second;
    if (!conn.handshaking || !conn.have_target_nonce || rep.generation != conn.generation ||
        rep.src_instance != conn.peer_instance || rep.dst_instance != instance_ ||
        rep.qps.size() != conn.slots.size() ||
        !auth::equal(auth::view(rep.initiator_nonce), auth::view(conn.initiator_nonce)) ||
        !auth::equal(auth::view(rep.target_nonce), auth::view(conn.target_nonce)) ||
        !verifyCm(rep, conn.peer_secret, kTargetLabel)) {
        return;  // stale, foreign, or not from the holder of the secret
    }
    conn.handshaking = false;
    const bool first = conn.state == ConnState::kConnecting;
    debugLog("peer '%s': %s reply, generation %u, MTU %u", conn.peer_name.c_str(),
             first ? "connect" : "repair", rep.generation, mtuBytes(static_cast<ibv_mtu>(rep.mtu)));
    if (first) {
        conn.mtu = static_cast<ibv_mtu>(std::clamp<int>(rep.mtu, IBV_MTU_256, device_->activeMtu()));
        conn.remote_rd_atomic = std::max<uint8_t>(1, rep.rd_atomic);
    }
    Status failure;
    for (size_t i = 0; i < conn.slots.size(); ++i) {
        Slot& s = conn.slots[i];
        if (s.state != SlotState::kIdle && s.state != SlotState::kRepairing) continue;
        Status st = connectSlot(conn, s, rep.qps[i]);
        if (!st.isOk()) {
            s.state = SlotState::kDead;
            if (failure.isOk()) failure = st;
        }
    }
    bool any = false;
    for (auto& s : conn.slots) any |= s.state == SlotState::kReady;
    if (first) {
        if (!any)
            return connectFailed(conn,
                                 failure.isOk() ? Status::internal("no queue pair connected") : failure);
        conn.state = ConnState::kReady;
        if (conn.connect_waiter) conn.connect_waiter->set(Status::ok());
        conn.connect_waiter.reset();
    } else if (!any) {
        connectionDead(conn, failure);
    }
    if (!conn.queue.empty() && !conn.in_ready && conn.registered) {
        conn.in_ready = true;
        ready_queue_.push_back(&conn);
    }
}

void Shared::onReject(const CmMessage& rej) {
    auto it = initiated_.find(rej.conn_id);
    if (it == initiated_.end() || !it->second->handshaking || rej.src_instance == 0) return;
    Connection& conn = *it->second;
    // REJECT is not authenticated (a restarted engine has another secret): it can only end
    // a handshake in progress, which an on-path attacker could stop anyway.
    const Status st =
        rej.reason == RejectReason::kWrongInstance || rej.reason == RejectReason::kUnauthenticated
            ? Status::peerUnreachable("ibverbs: peer '" + conn.peer_name + "' refused: " + rej.text)
            : Status::remote("ibverbs: peer '" + conn.peer_name + "' refused the connection: " + rej.text);
    connectFailed(conn, st);
}

void Shared::onDisconnect(const CmMessage& msg) {
    auto it = accepted_.find({msg.src_instance, msg.conn_id});
    if (it == accepted_.end()) return;
    const Connection& conn = *it->second;
    if (!auth::equal(auth::view(msg.initiator_nonce), auth::view(conn.initiator_nonce)) ||
        !auth::equal(auth::view(msg.target_nonce), auth::view(conn.target_nonce)) ||
        !verifyCm(msg, secret_, kDisconnectLabel)) {
        return;  // only the connection's initiator may end it
    }
    unregisterConnection(*it->second);
    accepted_.erase(it);
}

}  // namespace kvxfer::ib
