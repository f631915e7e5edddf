// TCP backend, target side: the listener thread and the serving of one inbound connection
// (HELLO handshake, WRITE / END / READ_REQ / NOTIFY frames checked against the region table),
// and the fencing of an initiator's older connections when it reconnects.
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <unordered_map>

#include "backends/tcp/tcp_internal.h"

namespace kvxfer::tcp {

// Registers a new connection of `initiator`, fencing off its older ones.
std::shared_ptr<InboundFence> Shared::newFence(uint64_t initiator, uint64_t link) {
    auto fence = std::make_shared<InboundFence>();
    std::vector<std::shared_ptr<InboundFence>> older;
    const std::pair<uint64_t, uint64_t> key{initiator, link};
    {
        std::lock_guard<std::mutex> lock(fence_mutex);
        for (auto it = fences.begin(); it != fences.end();) {
            auto f = it->second.lock();
            if (!f) {
                it = fences.erase(it);
                continue;
            }
            if (it->first == key) older.push_back(std::move(f));
            ++it;
        }
        fences.emplace(key, fence);
    }
    for (auto& f : older) {
        f->superseded.store(true);
        // A section in progress ends within one poll slice once it sees `superseded`.
        std::lock_guard<std::mutex> wait_out(f->section);
    }
    return fence;
}

namespace {

// The one answer to a run the target refuses: the same whatever was wrong (unknown or stale
// tag, outside the region, deregistered), so replies cannot be used to map its memory.
constexpr const char* kRefused =
    "tcp peer: the target refused the access (the region is not registered there any more, or the "
    "range lies outside it)";

}  // namespace

// One inbound connection. Served by a pool worker only while it has frames to read: between
// frames it is parked in the listener's epoll set, so idle peers cost no thread.
class InboundConnection {
public:
    InboundConnection(Shared& shared, int fd) : sh_(shared), fd_(fd), owned_(fd) {}
    int fd() const { return fd_; }

    // Serves frames until none is waiting. True: park the connection (it stays open);
    // false: close it (EOF, error, malformed frame, superseded, refused handshake).
    bool serveSome() {
        if (!fence_ && !handshake().isOk()) return false;
        if (!flushReply()) return false;
        uint8_t hb[kHeaderBytes];
        for (;;) {
            if (fence_->superseded.load()) return false;  // the initiator reconnected: stale stream
            if (pendingBytes() == 0) {
                uint8_t probe = 0;
                const ssize_t k = ::recv(fd_, &probe, 1, MSG_PEEK | MSG_DONTWAIT);
                if (k == 0) return false;
                if (k < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
            }
            if (!readIn(hb, sizeof(hb))) return false;
            Header h;
            if (!decodeHeader(hb, &h)) return false;      // malformed: close
            if (fence_->superseded.load()) return false;  // the initiator reconnected: stale stream
            bool ok = false;
            switch (h.type) {
                case kWrite:
                    ok = onWrite(h);
                    break;
                case kEnd:
                    ok = onEnd(h);
                    break;
                case kReadReq:
                    ok = onReadReq(h);
                    break;
                case kNotify:
                    ok = onNotify(h);
                    break;
                default:
                    ok = false;
            }
            if (!ok) return false;
        }
    }

private:
    // Ends a frame's socket I/O when the backend closes, the connection is superseded, or
    // the peer makes no progress for kFrameStall (a stopped or dead peer must not hold a
    // worker: between frames a connection holds none, inside one at most this long).
    struct StopCheck {
        const Shared* sh;
        const InboundFence* fence;
        std::optional<Clock::time_point> idle_since;
        Status operator()(bool idle) {
            if (sh->stopping.load()) return Status::canceled("tcp backend is closing");
            if (fence && fence->superseded.load())
                return Status::canceled("tcp: superseded by a newer connection");
            return stalled(idle, idle_since);
        }
    };
    StopCheck stopCheck() const { return {&sh_, fence_.get(), std::nullopt}; }

    static Status stalled(bool idle, std::optional<Clock::time_point>& since) {
        if (!idle) {
            since.reset();
            return Status::ok();
        }
        const auto now = Clock::now();
        if (!since) since = now;
        if (now - *since > kFrameStall)
            return Status::peerUnreachable("tcp: the peer stalled inside a frame");
        return Status::ok();
    }

    // A blocking reply (handshake, READ refusals): bounded by stopCheck.
    Status reply(const Header& h, const std::string& body = {}) {
        out_.clear();
        out_off_ = 0;
        appendFrame(out_, h, body.data(), body.size());
        Status st = sendBytes(fd_, out_.data(), out_.size(), stopCheck(), "tcp target reply");
        out_.clear();
        return st;
    }

    // The target's side of the authenticated handshake (tcp_wire.h). Nothing but a HELLO,
    // then a PROOF, is read before it succeeds; a refusal never names this instance.
    Status handshake() {
        const auto deadline = Clock::now() + kHandshakeTimeout;
        auto check = [&](bool) {
            if (sh_.stopping.load()) return Status::canceled("tcp backend is closing");
            if (Clock::now() >= deadline) return Status::timeout("tcp: no HELLO from the connecting peer");
            return Status::ok();
        };
        uint8_t hb[kHeaderBytes];
        KVXFER_RETURN_IF_ERROR(recvBytes(fd_, hb, sizeof(hb), check, "tcp hello"));
        Header h;
        if (!decodeHeader(hb, &h) || h.type != kHello || h.aux == 0 || h.aux > kMaxNameBytes) {
            return Status::remote("malformed HELLO");
        }
        std::vector<uint8_t> body(h.aux + auth::kNonceBytes);
        KVXFER_RETURN_IF_ERROR(recvBytes(fd_, body.data(), body.size(), check, "tcp hello"));
        peer_name_.assign(reinterpret_cast<const char*>(body.data()), h.aux);
        const ByteView theirs(body.data() + h.aux, auth::kNonceBytes);
        peer_instance_ = h.job;
        const uint64_t link = h.b;
        auto refuse = [&](StatusCode code, const std::string& msg) {
            (void)reply({.type = kHelloAck, .aux = static_cast<uint32_t>(code), .b = msg.size()}, msg);
            return Status(code, msg);
        };
        if (h.a != sh_.instance) {
            return refuse(StatusCode::kPeerUnreachable,
                          "no engine instance of that id listens here (the peer restarted)");
        }
        KVXFER_ASSIGN_OR_RETURN(const auth::Nonce mine, auth::randomNonce());
        const auth::Mac ours = auth::mac(sh_.secret, {auth::view(kTargetLabel), theirs, auth::view(mine)});
        std::vector<uint8_t> challenge(mine.begin(), mine.end());
        challenge.insert(challenge.end(), ours.begin(), ours.end());
        out_.clear();
        appendFrame(out_, {.type = kChallenge, .b = challenge.size()}, challenge.data(), challenge.size());
        KVXFER_RETURN_IF_ERROR(sendBytes(fd_, out_.data(), out_.size(), check, "tcp hello"));
        KVXFER_RETURN_IF_ERROR(recvBytes(fd_, hb, sizeof(hb), check, "tcp hello"));
        uint8_t proof[auth::kMacBytes];
        if (!decodeHeader(hb, &h) || h.type != kProof || h.b != sizeof(proof)) {
            return refuse(StatusCode::kRemote, "authentication failed");
        }
        KVXFER_RETURN_IF_ERROR(recvBytes(fd_, proof, sizeof(proof), check, "tcp hello"));
        const uint64_t instance = peer_instance_;
        const auth::Mac expected =
            auth::mac(sh_.secret, {auth::view(kInitiatorLabel), auth::view(mine), theirs,
                                   auth::view(instance), auth::view(link), auth::view(peer_name_)});
        if (!auth::equal(auth::view(expected), ByteView(proof, sizeof(proof)))) {
            return refuse(StatusCode::kRemote, "authentication failed");
        }
        fence_ = sh_.newFence(peer_instance_, link);
        return reply({.type = kHelloAck, .job = sh_.instance});
    }

    // Reads and checks a run table of `n` runs totalling `bytes`. False: malformed.
    bool readTable(const Header& h) {
        const uint32_t n = h.aux;
        if (n == 0 || n > kMaxBatchRuns || h.b > kMaxBatchBytes) return false;
        table_.resize(static_cast<size_t>(n) * 16);
        if (!readIn(table_.data(), table_.size())) return false;
        return tableValid(table_.data(), n, h.b);
    }
    // The run table at `t` (n runs) has valid lengths that sum to `bytes`.
    static bool tableValid(const uint8_t* t, uint32_t n, uint64_t bytes) {
        uint64_t sum = 0;
        for (uint32_t i = 0; i < n; ++i) {
            const uint64_t len = getLe(t + 16 * i + 8, 8);
            if (len == 0 || len > kMaxRunBytes) return false;
            sum += len;
        }
        return sum == bytes;
    }
    uint64_t runAddr(uint32_t i) const { return getLe(table_.data() + 16 * i, 8); }
    uint64_t runLen(uint32_t i) const { return getLe(table_.data() + 16 * i + 8, 8); }

    bool discard(uint64_t n) {
        const size_t from_pending = static_cast<size_t>(std::min<uint64_t>(n, pendingBytes()));
        pend_off_ += from_pending;
        if (pendingBytes() == 0) dropPending();
        n -= from_pending;
        while (n > 0) {
            if (scratch_.empty()) scratch_.resize(kScratchBytes);  // only connections that discard pay for it
            const size_t step = static_cast<size_t>(std::min<uint64_t>(n, scratch_.size()));
            if (!recvBytes(fd_, scratch_.data(), step, stopCheck(), "tcp target").isOk()) return false;
            n -= step;
        }
        return true;
    }

    void failJob(uint64_t job, Status st) { failed_.emplace(job, std::move(st)); }

    bool onWrite(const Header& h) {
        if (!readTable(h)) return false;
        if (failed_.size() > 65536) return false;       // a peer that never sends END
        if (failed_.count(h.job)) return discard(h.b);  // already failed: drop the rest
        Pins pins(sh_.regions);
        for (uint32_t i = 0; i < h.aux; ++i) {
            if (!pins.pin(h.a, runAddr(i), runLen(i))) {
                pins.release();
                failJob(h.job, Status::remote(kRefused));
                return discard(h.b);
            }
        }
        std::unique_lock<std::mutex> section(fence_->section);
        if (fence_->superseded.load()) return false;
        IovCursor cur;
        for (uint32_t i = 0; i < h.aux; ++i) cur.add(reinterpret_cast<void*>(runAddr(i)), runLen(i));
        bool region_gone = false;
        std::optional<Clock::time_point> idle_since;
        auto check = [&](bool idle) {
            if (Status st = stalled(idle, idle_since); !st.isOk()) return st;
            if (sh_.stopping.load()) return Status::canceled("tcp backend is closing");
            if (fence_->superseded.load()) return Status::canceled("tcp: superseded by a newer connection");
            if (!pins.alive()) {
                region_gone = true;
                return Status::remote("tcp peer: a destination region was deregistered during the transfer");
            }
            return Status::ok();
        };
        takePending(cur);
        Status st = moveAll(fd_, false, cur, check, "tcp target");
        if (st.isOk()) return true;
        if (!region_gone) return false;
        section.unlock();
        pins.release();
        failJob(h.job, st);
        return discard(cur.remaining());
    }

    bool onEnd(const Header& h) {
        if (h.b > kMaxNotifyBytes) return false;
        Bytes payload(h.b);
        if (!readIn(payload.data(), payload.size())) return false;
        return endFrame(h, std::move(payload));
    }

    // An END whose notification was read: deliver it (unless the job failed or was
    // aborted) and answer ACK.
    bool endFrame(const Header& h, Bytes payload) {
        Status st;
        if (auto it = failed_.find(h.job); it != failed_.end()) {
            st = std::move(it->second);
            failed_.erase(it);
        }
        if (h.aux & kEndAbort) return true;
        // A full notification queue fails the transfer with kBackPressure (its bytes are in
        // place; the notification is not, and the initiator is told).
        if (st.isOk() && (h.aux & kEndNotify))
            st = sh_.sink->deliver(peer_name_, peer_instance_, std::move(payload));
        const std::string& msg = st.message();
        return answer({.type = kAck, .aux = static_cast<uint32_t>(st.code()), .job = h.job, .b = msg.size()},
                      msg);
    }

    bool onReadReq(const Header& h) {
        if (!readTable(h)) return false;
        Pins pins(sh_.regions);
        for (uint32_t i = 0; i < h.aux; ++i) {
            if (!pins.pin(h.a, runAddr(i), runLen(i))) {
                const std::string msg = kRefused;
                return reply({.type = kReadData,
                              .aux = static_cast<uint32_t>(StatusCode::kRemote),
                              .job = h.job,
                              .b = msg.size()},
                             msg)
                    .isOk();
            }
        }
        std::unique_lock<std::mutex> section(fence_->section);
        if (fence_->superseded.load()) return false;
        uint8_t hb[kHeaderBytes];
        encodeHeader({.type = kReadData, .aux = 0, .job = h.job, .b = h.b}, hb);
        IovCursor cur;
        cur.add(hb, sizeof(hb));
        for (uint32_t i = 0; i < h.aux; ++i) cur.add(reinterpret_cast<void*>(runAddr(i)), runLen(i));
        std::optional<Clock::time_point> idle_since;
        auto check = [&](bool idle) {
            if (Status st = stalled(idle, idle_since); !st.isOk()) return st;
            if (sh_.stopping.load()) return Status::canceled("tcp backend is closing");
            if (fence_->superseded.load()) return Status::canceled("tcp: superseded by a newer connection");
            // Mid-frame there is no way to tell the peer: the connection goes down instead.
            if (!pins.alive()) return Status::remote("source region deregistered during a read");
            return Status::ok();
        };
        return moveAll(fd_, true, cur, check, "tcp target").isOk();
    }

    bool onNotify(const Header& h) {
        if (h.b > kMaxNotifyBytes) return false;
        Bytes payload(h.b);
        if (!readIn(payload.data(), payload.size())) return false;
        return notifyFrame(h, std::move(payload));
    }

    bool notifyFrame(const Header& h, Bytes payload) {
        const Status st = sh_.sink->deliver(peer_name_, peer_instance_, std::move(payload));
        const std::string& msg = st.message();
        return answer(
            {.type = kNotifyAck, .aux = static_cast<uint32_t>(st.code()), .job = h.job, .b = msg.size()},
            msg);
    }

    // ---- buffered input: bytes the quick path read past the frames it served ----------------

    size_t pendingBytes() const { return pend_.size() - pend_off_; }

    // Frees the buffer once consumed (up to kQuickBufferBytes: connections must not keep it).
    void dropPending() {
        std::vector<uint8_t>().swap(pend_);
        pend_off_ = 0;
    }

    // Reads exactly n bytes: what is pending first, then the socket (blocking, bounded).
    bool readIn(void* dst, size_t n) {
        const size_t take = std::min(n, pendingBytes());
        if (take) {
            std::memcpy(dst, pend_.data() + pend_off_, take);
            pend_off_ += take;
            if (pendingBytes() == 0) {
                dropPending();
            }
        }
        if (take == n) return true;
        return recvBytes(fd_, static_cast<uint8_t*>(dst) + take, n - take, stopCheck(), "tcp target").isOk();
    }

    // Fills the front of `cur` with pending bytes.
    void takePending(IovCursor& cur) {
        while (pendingBytes() > 0 && !cur.empty()) {
            iovec* v = cur.data();
            const size_t step = std::min(v->iov_len, pendingBytes());
            std::memcpy(v->iov_base, pend_.data() + pend_off_, step);
            pend_off_ += step;
            cur.advance(step);
        }
        if (pendingBytes() == 0) {
            dropPending();
        }
    }

    // ---- replies -------------------------------------------------------------------------

    // Sends a reply frame. One non-blocking send first (the common case: the ACK leaves at
    // once); what does not fit then goes out blocking (bounded by stopCheck) on a worker,
    // or, on the quick path, is kept for the worker the connection is handed to.
    bool answer(const Header& h, const std::string& body) {
        out_.clear();
        out_off_ = 0;
        appendFrame(out_, h, body.data(), body.size());
        ssize_t k = ::send(fd_, out_.data(), out_.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        while (k < 0 && errno == EINTR)
            k = ::send(fd_, out_.data(), out_.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return false;
        out_off_ = k > 0 ? static_cast<size_t>(k) : 0;
        if (out_off_ == out_.size()) {
            out_.clear();
            out_off_ = 0;
            return true;
        }
        return quick_ || flushReply();
    }
    bool replyPending() const { return out_off_ < out_.size(); }
    // Sends what is left of the last reply (blocking, bounded by stopCheck).
    bool flushReply() {
        if (!replyPending()) return true;
        const Status st =
            sendBytes(fd_, out_.data() + out_off_, out_.size() - out_off_, stopCheck(), "tcp target reply");
        out_.clear();
        out_off_ = 0;
        return st.isOk();
    }

public:
    // At shutdown (stopServing): one last bounded attempt to send a reply that is still
    // pending. The stop check is already failing, so this is one slice at most.
    void finishReply() {
        if (!replyPending()) return;
        auto one_slice = [](bool idle) {
            return idle ? Status::timeout("tcp: reply not taken") : Status::ok();
        };
        (void)sendBytes(fd_, out_.data() + out_off_, out_.size() - out_off_, one_slice, "tcp target reply");
    }

    // The quick path, on the thread that saw the connection readable (the listener): reads
    // what is there into `buf` (non-blocking, a few large recv calls) and serves every
    // complete WRITE / END / NOTIFY frame that fits in it straight from the buffer, replies
    // included (no hand-off, no blocking call), then parks the connection.
    // kToWorker: a frame is incomplete or large, another frame type, the handshake, or a
    // reply that did not fit in the socket; the bytes read stay pending for the worker.
    // kIdle: nothing to read (parked as it was).
    enum class Quick : uint8_t { kPark, kIdle, kClose, kToWorker };
    Quick serveQuick(uint8_t* buf, size_t cap) {
        if (!fence_ || pendingBytes() > 0 || replyPending()) return Quick::kToWorker;
        quick_ = true;
        const Quick q = quickLoop(buf, cap);
        quick_ = false;
        return q;
    }

private:
    Quick quickLoop(uint8_t* buf, size_t cap) {
        size_t have = 0;  // bytes in buf from its start, not yet served
        for (int rounds = 0; rounds < kQuickRounds;) {
            if (sh_.stopping.load() || fence_->superseded.load()) return Quick::kClose;
            const size_t want = rounds == 0 ? std::min(cap - have, kQuickFirstReadBytes) : cap - have;
            const ssize_t k = ::recv(fd_, buf + have, want, MSG_DONTWAIT);
            if (k == 0) return Quick::kClose;
            if (k < 0) {
                if (errno == EINTR) continue;
                if (errno != EAGAIN && errno != EWOULDBLOCK) return Quick::kClose;
                if (have > 0) return handOff(buf, have);  // a frame is still arriving
                // Nothing more: park (the listener's spin, if on, polls for the next one).
                return rounds == 0 ? Quick::kIdle : Quick::kPark;
            }
            ++rounds;
            const bool filled = static_cast<size_t>(k) == want;
            have += static_cast<size_t>(k);
            size_t off = 0;
            for (;;) {
                Header h;
                if (have - off < kHeaderBytes) break;
                if (!decodeHeader(buf + off, &h)) return Quick::kClose;  // malformed
                const uint64_t need = quickFrameBytes(h);
                if (need == 0 || need > cap) {  // not served here (type, size): the worker
                    std::memmove(buf, buf + off, have - off);
                    return handOff(buf, have - off);
                }
                if (need > have - off) break;  // incomplete
                if (!quickFrame(h, buf + off + kHeaderBytes)) return Quick::kClose;
                off += need;
                if (replyPending()) {  // the socket is full: the worker sends the rest
                    std::memmove(buf, buf + off, have - off);
                    return handOff(buf, have - off);
                }
            }
            std::memmove(buf, buf + off, have - off);
            have -= off;
            // Everything read was served and the read did not fill the buffer: park without
            // another recv (epoll reports the connection again if more came).
            if (have == 0 && !filled) return Quick::kPark;
        }
        if (have > 0) return handOff(buf, have);
        return Quick::kPark;  // fair to other connections: epoll reports it again if more came
    }

    Quick handOff(const uint8_t* buf, size_t n) {
        pend_.assign(buf, buf + n);
        pend_off_ = 0;
        return Quick::kToWorker;
    }

    // Bytes of a frame the quick path serves from its buffer (header included); 0: not one.
    static uint64_t quickFrameBytes(const Header& h) {
        switch (h.type) {
            case kWrite:
                if (h.aux == 0 || h.aux > kMaxBatchRuns || h.b > kMaxBatchBytes) return 0;
                return kHeaderBytes + 16ull * h.aux + h.b;
            case kEnd:
            case kNotify:
                if (h.b > kMaxNotifyBytes) return 0;
                return kHeaderBytes + h.b;
            default:
                return 0;
        }
    }

    // Serves one complete frame whose body is at `body`. False: close the connection.
    bool quickFrame(const Header& h, const uint8_t* body) {
        switch (h.type) {
            case kWrite:
                return writeFromBuffer(h, body, body + 16ull * h.aux);
            case kEnd:
                return endFrame(h, Bytes(body, body + h.b));
            case kNotify:
                return notifyFrame(h, Bytes(body, body + h.b));
            default:
                return false;
        }
    }

    // A WRITE whose run table and payload are in memory: the same checks and fencing as
    // onWrite, then one copy per run.
    bool writeFromBuffer(const Header& h, const uint8_t* table, const uint8_t* payload) {
        if (!tableValid(table, h.aux, h.b)) return false;
        if (failed_.size() > 65536) return false;  // a peer that never sends END
        if (failed_.count(h.job)) return true;     // already failed: drop it
        auto addr = [&](uint32_t i) { return getLe(table + 16 * i, 8); };
        auto len = [&](uint32_t i) { return getLe(table + 16 * i + 8, 8); };
        Pins pins(sh_.regions);
        for (uint32_t i = 0; i < h.aux; ++i) {
            if (!pins.pin(h.a, addr(i), len(i))) {
                pins.release();
                failJob(h.job, Status::remote(kRefused));
                return true;
            }
        }
        std::lock_guard<std::mutex> section(fence_->section);
        if (fence_->superseded.load()) return false;
        for (uint32_t i = 0; i < h.aux; ++i) {
            std::memcpy(reinterpret_cast<void*>(addr(i)), payload, len(i));
            payload += len(i);
        }
        return true;
    }

    Shared& sh_;
    int fd_;
    Fd owned_;  // closed with the connection object
    std::string peer_name_;
    uint64_t peer_instance_ = 0;
    std::vector<uint8_t> table_;
    std::vector<uint8_t> scratch_;
    std::vector<uint8_t> out_;  // the last reply; [out_off_, size) not sent yet
    size_t out_off_ = 0;
    std::vector<uint8_t> pend_;  // read by the quick path, not consumed yet (for the worker)
    size_t pend_off_ = 0;
    bool quick_ = false;                           // inside serveQuick: never block
    std::unordered_map<uint64_t, Status> failed_;  // WRITE jobs that hit an error, until their END
    std::shared_ptr<InboundFence> fence_;
};

namespace {

// Connections sit in the listener's epoll set (level-triggered) while the listener serves
// them; one handed to a worker leaves the set (unpark) and comes back when the worker is
// done (park). So the common case, a small frame served by the listener, costs no
// epoll_ctl, and a connection is never served by two threads at once.
void park(Shared& sh, int fd) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (::epoll_ctl(sh.epoll_fd.fd, EPOLL_CTL_ADD, fd, &ev) != 0 && errno == EEXIST) {
        (void)::epoll_ctl(sh.epoll_fd.fd, EPOLL_CTL_MOD, fd, &ev);
    }
}

void unpark(Shared& sh, int fd) { (void)::epoll_ctl(sh.epoll_fd.fd, EPOLL_CTL_DEL, fd, nullptr); }

void dropConnection(Shared& sh, int fd) {
    unpark(sh, fd);  // a hung-up socket must not keep waking the listener until it closes
    ::shutdown(fd, SHUT_RDWR);
    std::lock_guard<std::mutex> lock(sh.mutex);
    sh.conns.erase(fd);  // the fd closes with the last reference
}

// A pool worker: serves ready connections; parks them again or closes them.
void workerLoop(const std::shared_ptr<Shared>& sh) {
    for (;;) {
        std::shared_ptr<InboundConnection> c;
        {
            std::unique_lock<std::mutex> lock(sh->mutex);
            ++sh->idle_workers;
            sh->cv.wait(lock, [&] { return sh->stopping.load() || !sh->ready.empty(); });
            --sh->idle_workers;
            if (sh->stopping.load()) return;
            c = std::move(sh->ready.front());
            sh->ready.pop_front();
        }
        if (c->serveSome() && !sh->stopping.load()) {
            park(*sh, c->fd());
            continue;
        }
        dropConnection(*sh, c->fd());
    }
}

void onAccept(const std::shared_ptr<Shared>& sh, int c) {
    std::lock_guard<std::mutex> lock(sh->mutex);
    if (sh->conns.size() >= kMaxInbound) {  // bounded: refuse instead of growing
        ::close(c);
        return;
    }
    tuneConnection(c);
    setSliceTimeouts(c);
    auto conn = std::make_shared<InboundConnection>(*sh, c);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = c;
    if (::epoll_ctl(sh->epoll_fd.fd, EPOLL_CTL_ADD, c, &ev) != 0) return;  // conn closes the fd
    sh->conns.emplace(c, std::move(conn));
}

using Quick = InboundConnection::Quick;

// A parked connection that is (or may be) readable, on the listener thread: small frames
// are served here, at once; the rest goes to the worker pool. kPark / kIdle: it stays
// parked (in the epoll set), served only by the listener.
Quick serveReadable(const std::shared_ptr<Shared>& sh, std::shared_ptr<InboundConnection> c,
                    std::vector<uint8_t>& buf) {
    const int fd = c->fd();
    const Quick q = c->serveQuick(buf.data(), buf.size());
    switch (q) {
        case Quick::kPark:
        case Quick::kIdle:
            return q;  // still in the epoll set
        case Quick::kClose:
            dropConnection(*sh, fd);
            return q;
        case Quick::kToWorker:
            unpark(*sh, fd);
            break;
    }
    std::lock_guard<std::mutex> lock(sh->mutex);
    if (sh->stopping.load()) return q;  // stopServing finishes its reply
    sh->ready.push_back(std::move(c));
    // The pool grows only with connections that are busy at the same time, never with
    // connected ones.
    if (sh->idle_workers == 0 && sh->workers.size() < kMaxWorkers) {
        sh->workers.push_back(ThreadGroup::startChild([sh] { workerLoop(sh); }));
    }
    sh->cv.notify_one();
    return q;
}

// The connection epoll reported readable, if it is still one: serveReadable.
std::shared_ptr<InboundConnection> connectionOf(Shared& sh, int fd) {
    std::lock_guard<std::mutex> lock(sh.mutex);
    auto it = sh.conns.find(fd);
    return it == sh.conns.end() ? nullptr : it->second;
}

// After the listener's loop: wakes and joins the workers, closes every connection.
void stopServing(Shared& sh) {
    std::vector<std::thread> workers;
    {
        std::lock_guard<std::mutex> lock(sh.mutex);
        // Ends the read side only: a worker blocked inside a frame wakes (EOF) and stops,
        // while one that has delivered a notification still sends its ACK (the initiator
        // must not see a lost connection for a transfer whose notification arrived).
        for (auto& [fd, c] : sh.conns) ::shutdown(fd, SHUT_RD);
        workers.swap(sh.workers);
    }
    sh.cv.notify_all();
    for (auto& t : workers) t.join();
    std::unordered_map<int, std::shared_ptr<InboundConnection>> conns;
    {
        std::lock_guard<std::mutex> lock(sh.mutex);
        sh.ready.clear();
        conns.swap(sh.conns);
    }
    // Replies the quick path could not finish (a full socket) go out now, bounded by the
    // slice timeout.
    for (auto& [fd, c] : conns) c->finishReply();
    for (auto& [fd, c] : conns) ::shutdown(fd, SHUT_RDWR);
}

}  // namespace

void listenLoop(const std::shared_ptr<Shared>& sh) {
    for (int fd : {sh->listen_fd.fd, sh->wake_fd.fd}) {
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.fd = fd;
        ::epoll_ctl(sh->epoll_fd.fd, EPOLL_CTL_ADD, fd, &ev);
    }
    std::vector<uint8_t> buf(kQuickBufferBytes);  // the quick path's input buffer
    epoll_event events[64];
    AdaptiveSpin spin;
    spin.setBudget(sh->spin_us);
    bool served = false;  // the last wake-up served small frames itself: the next may be near
    // The parked connection the listener served last: its spin reads that one directly (one
    // recv per look instead of epoll_wait + recv) and the whole set every 4th look. Only the
    // listener serves or closes a parked connection, so it stays valid while parked.
    std::shared_ptr<InboundConnection> hot;
    for (;;) {
        int n = 0;
        // After serving, poll without sleeping for up to the spin budget (spin.h). The stop
        // ends it within one look (`stopping`; wake_fd is in the set).
        if (const auto budget = served ? spin.next() : Clock::duration::zero(); budget.count() > 0) {
            const auto end = Clock::now() + budget;
            bool hit = false;
            for (uint32_t look = 1;; ++look) {
                if (hot && look % 4 != 0) {
                    const Quick q = serveReadable(sh, hot, buf);
                    if (q != Quick::kIdle) {
                        hit = true;
                        served = q == Quick::kPark;
                        if (!served) hot.reset();
                        break;
                    }
                } else {
                    n = ::epoll_wait(sh->epoll_fd.fd, events, 64, 0);
                    if (n != 0) break;
                }
                if (sh->stopping.load(std::memory_order_relaxed) || Clock::now() >= end) break;
                spinPause();
            }
            spin.result(hit || n > 0);
            if (hit) continue;  // served here: spin again
        }
        // No timeout: the stop writes wake_fd (level-triggered, never drained), and a finite
        // one arms and cancels a kernel timer on every wait, i.e. on every small request.
        if (n <= 0 && !sh->stopping.load()) n = ::epoll_wait(sh->epoll_fd.fd, events, 64, -1);
        if (sh->stopping.load()) {
            hot.reset();  // every connection closes in stopServing
            stopServing(*sh);
            return;
        }
        served = false;
        hot.reset();
        for (int i = 0; i < n; ++i) {
            const int fd = events[i].data.fd;
            if (fd == sh->wake_fd.fd) continue;
            if (fd != sh->listen_fd.fd) {
                if (auto c = connectionOf(*sh, fd)) {
                    // Spin only after serving frames here (small requests): a connection
                    // handed to a worker (bulk, READ) brings its next frames to the worker.
                    const Quick q = serveReadable(sh, c, buf);
                    if (q == Quick::kPark) {
                        hot = std::move(c);
                        served = true;
                    }
                }
                continue;
            }
            for (;;) {
                const int c = ::accept4(sh->listen_fd.fd, nullptr, nullptr, SOCK_CLOEXEC);
                if (c >= 0) {
                    onAccept(sh, c);
                    continue;
                }
                if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                    std::this_thread::sleep_for(10ms);  // do not spin on a pending connection
                }
                break;
            }
        }
    }
}

}  // namespace kvxfer::tcp
