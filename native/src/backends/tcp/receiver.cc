// TCP backend, initiator side: the receiver thread of a session. It reads ACK, NOTIFY_ACK and
// READ_DATA frames (READ data straight into local memory), scans for abandoned writes and
// stalled peers, and fails what it owns once the connection is dead.
#include <poll.h>
#include <sys/eventfd.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "backends/tcp/tcp_internal.h"

namespace kvxfer::tcp {
namespace {

// Receiver housekeeping every kScanInterval: ends abandoned writes that only wait for an
// ACK (their memory is no longer touched) and detects a peer that stalls.
Status scanPending(PeerConn& c, Session& s, Clock::time_point now, Clock::time_point last_rx) {
    std::vector<std::pair<std::shared_ptr<TransferJob>, Status>> finish;
    std::vector<std::shared_ptr<NotifyWaiter>> expired;
    Status kill;
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        for (auto it = s.pending.begin(); it != s.pending.end();) {
            Pending& p = it->second;
            const TransferJob& job = *p.job;
            if (!p.streaming && p.committed && pastDeadline(job.deadline, now)) {
                // The core ended it TIMEOUT at its deadline; its memory is no longer touched
                // (END sent), so let go now. A late ACK finds no entry and is ignored.
                finish.emplace_back(p.job, Status::timeout(c.label() + " did not acknowledge transfer " +
                                                           std::to_string(job.id) + " by its deadline"));
                it = s.pending.erase(it);
                continue;
            } else if (!p.streaming && !p.committed && job.op == Op::kWrite && p.awaiting_ack &&
                       job.abandoned()) {
                finish.emplace_back(p.job, Status::canceled("tcp: write abandoned"));
                it = s.pending.erase(it);
                continue;
            } else if (job.op == Op::kRead && p.reads_outstanding > 0 && job.abandoned() &&
                       now - last_rx > kStallGrace) {
                kill = Status::peerUnreachable(c.label() + " stopped sending read data");
            }
            ++it;
        }
        for (auto it = s.waiters.begin(); it != s.waiters.end();) {
            if (pastDeadline(it->second->deadline, now, kStallGrace)) {
                expired.push_back(it->second);
                it = s.waiters.erase(it);
            } else {
                ++it;
            }
        }
    }
    for (auto& w : expired) w->complete(Status::timeout(c.label() + " did not acknowledge a notification"));
    finishAll(finish);
    return kill;
}

// Whether the receiver must lead the read side now (under c.mutex): a job or notification
// that no waiting caller reads for, bytes a caller left, or a hang-up to notice. Inline
// jobs are left to their poster until their grace ends (`*next` is the earliest such end).
bool receiverNeeded(const Session& s, Clock::time_point now, Clock::time_point* next) {
    if (s.hup || s.rx_len > 0 || !s.waiters.empty() || !s.batches.empty()) return true;
    for (const auto& [id, p] : s.pending) {
        if (!p.inline_job || now >= p.grace_until) return true;
        *next = std::min(*next, p.grace_until);
    }
    return false;
}

// The frames at the front of s.rx, parsed and acted on. ACK and NOTIFY_ACK are handled
// once complete in the buffer. READ_DATA is handled only by the receiver (`receiver`):
// its body is copied from the buffer, then read from the socket straight into local
// memory; a caller stops before it (*handover) and leaves it to the receiver.
Status parseFrames(PeerConn& c, const std::shared_ptr<Session>& sp, bool receiver,
                   const std::function<Status(bool)>& check, bool* handover) {
    Session& s = *sp;
    const std::string what = "tcp connection to peer '" + c.peer_name + "'";
    auto malformed = [&](const char* why) {
        return Status::peerUnreachable(what + ": malformed frame (" + why + ")");
    };
    std::vector<std::pair<std::shared_ptr<TransferJob>, Status>> finish;
    size_t off = 0;
    Status result;
    auto consume = [&](size_t n) { off += n; };
    // Copies up to n body bytes from the buffer to dst; the rest from the socket.
    auto body = [&](uint8_t* dst, size_t n) -> Status {
        const size_t take = std::min(n, s.rx_len - off);
        std::memcpy(dst, s.rx.data() + off, take);
        consume(take);
        if (take == n) return Status::ok();
        return recvBytes(s.fd.fd, dst + take, n - take, check, what.c_str());
    };
    while (result.isOk() && s.rx_len - off >= kHeaderBytes) {
        Header h;
        if (!decodeHeader(s.rx.data() + off, &h)) {
            result = malformed("bad magic or version");
            break;
        }
        if (h.type == kAck || h.type == kNotifyAck) {
            if (h.b > kMaxMessageBytes) {
                result = malformed("message too long");
                break;
            }
            if (s.rx_len - off < kHeaderBytes + h.b) break;  // incomplete
            const std::string msg(reinterpret_cast<const char*>(s.rx.data() + off + kHeaderBytes), h.b);
            consume(kHeaderBytes + h.b);
            const Status st = h.aux == 0 ? Status::ok() : statusFromWire(h.aux, msg);
            if (h.type == kAck) {
                std::lock_guard<std::mutex> lock(c.mutex);
                auto it = s.pending.find(h.job);
                // Absent: abandoned and already finished.
                if (it != s.pending.end() && it->second.awaiting_ack) {
                    finish.emplace_back(it->second.job, st);
                    s.pending.erase(it);
                } else if (it != s.pending.end() && it->second.streaming) {
                    // The inline path sent WRITE and END in one call and has not let go
                    // yet: releaseStreaming() finishes it with this outcome.
                    it->second.acked = true;
                    it->second.ack_status = st;
                }
            } else {
                std::shared_ptr<NotifyWaiter> w;
                {
                    std::lock_guard<std::mutex> lock(c.mutex);
                    if (auto it = s.waiters.find(h.job); it != s.waiters.end()) {
                        w = std::move(it->second);
                        s.waiters.erase(it);
                    }
                }
                if (w) w->complete(st);
            }
            continue;
        }
        if (h.type != kReadData) {
            result = malformed("unknown frame type");
            break;
        }
        if (!receiver) {
            *handover = true;
            break;
        }
        consume(kHeaderBytes);
        ReadBatch batch{};
        std::shared_ptr<TransferJob> job;
        {
            std::lock_guard<std::mutex> lock(c.mutex);
            if (s.batches.empty() || s.batches.front().job != h.job) {
                result = malformed("unexpected READ_DATA");
                break;
            }
            batch = s.batches.front();
            s.batches.pop_front();
            auto it = s.pending.find(h.job);
            if (it == s.pending.end()) {
                result = malformed("READ_DATA for an unknown job");
                break;
            }
            job = it->second.job;
        }
        Status outcome;
        if (h.aux != 0) {
            if (h.b > kMaxMessageBytes) {
                result = malformed("message too long");
                break;
            }
            std::string msg(h.b, '\0');
            result = body(reinterpret_cast<uint8_t*>(msg.data()), msg.size());
            if (!result.isOk()) break;
            outcome = statusFromWire(h.aux, msg);
        } else {
            if (h.b != batch.bytes) {
                result = malformed("READ_DATA length differs from the request");
                break;
            }
            IovCursor cur;
            for (uint64_t i = batch.first; i < batch.end; ++i) {
                const FlatRun r = job->run(i);
                cur.add(r.local, r.length);
            }
            while (!cur.empty() && off < s.rx_len) {
                iovec* v = cur.data();
                const size_t step = std::min(v->iov_len, s.rx_len - off);
                std::memcpy(v->iov_base, s.rx.data() + off, step);
                consume(step);
                cur.advance(step);
            }
            result = moveAll(s.fd.fd, false, cur, check, what.c_str());
            if (!result.isOk()) break;
        }
        {
            std::lock_guard<std::mutex> lock(c.mutex);
            s.window -= batch.bytes;
            auto it = s.pending.find(h.job);
            if (it != s.pending.end()) {
                Pending& p = it->second;
                --p.reads_outstanding;
                if (!outcome.isOk() && p.error.isOk()) p.error = outcome;
                if (!p.streaming && p.reads_outstanding == 0) completeRead(c, sp, it, finish);
            }
        }
        c.cv.notify_all();
    }
    std::memmove(s.rx.data(), s.rx.data() + off, s.rx_len - off);
    s.rx_len -= off;
    finishAll(finish);
    return result;
}

// Reads what the socket has into s.rx (the caller leads the read side). `block`: wait up
// to one slice (SO_RCVTIMEO) for the first byte. OK with *got = 0: nothing came.
Status readInto(PeerConn& c, Session& s, bool block, size_t* got) {
    *got = 0;
    if (s.rx.empty()) s.rx.resize(kRxBufferBytes);
    for (;;) {
        const ssize_t k =
            ::recv(s.fd.fd, s.rx.data() + s.rx_len, s.rx.size() - s.rx_len, block ? 0 : MSG_DONTWAIT);
        if (k > 0) {
            s.rx_len += static_cast<size_t>(k);
            *got = static_cast<size_t>(k);
            return Status::ok();
        }
        if (k == 0) return Status::peerUnreachable(c.label() + ": connection closed by the peer");
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return Status::ok();
        const int err = errno;
        return Status::peerUnreachable(c.label() + ": tcp receive: " + errnoText(err));
    }
}

Status receiverRun(PeerConn& c, const std::shared_ptr<Session>& sp) {
    Session& s = *sp;
    auto last_rx = Clock::now();
    auto last_scan = last_rx;
    std::function<Status(bool)> check = [&](bool idle) -> Status {
        if (c.stopping.load()) return Status::canceled(c.label() + ": connection closed");
        if (s.dead.load()) return Status::peerUnreachable(c.label() + ": connection lost");
        const auto now = Clock::now();
        if (!idle) last_rx = now;
        if (now - last_scan >= kScanInterval) {
            last_scan = now;
            return scanPending(c, s, now, last_rx);
        }
        return Status::ok();
    };
    for (;;) {
        // Lead the read side only while something needs the receiver.
        auto next = Clock::time_point::max();
        bool lead = false, hup = false;
        {
            std::lock_guard<std::mutex> lock(c.mutex);
            if (s.reader == Reader::kNone && receiverNeeded(s, Clock::now(), &next)) {
                s.reader = Reader::kReceiver;
                lead = true;
            }
            hup = s.hup;
        }
        if (!lead) {
            // Idle: sleep until woken, a hang-up or error on the socket (its data wakes only
            // the caller reading it: no POLLIN here), the next scan or the next inline grace.
            const auto now = Clock::now();
            auto until = std::min(next, last_scan + kScanInterval);
            if (hup) until = std::min(until, now + 1ms);  // a caller leads and will see it
            const auto wait_ms = std::chrono::ceil<std::chrono::milliseconds>(until - now).count();
            pollfd fds[2] = {{s.wake.fd, POLLIN, 0}, {s.fd.fd, POLLRDHUP, 0}};
            const int n = ::poll(fds, hup ? 1 : 2, static_cast<int>(std::clamp<int64_t>(wait_ms, 0, 100)));
            if (n > 0 && (fds[0].revents & POLLIN)) {
                uint64_t v;
                (void)!::read(s.wake.fd, &v, sizeof(v));
            }
            if (n > 0 && !hup && fds[1].revents != 0) {
                std::lock_guard<std::mutex> lock(c.mutex);
                s.hup = true;
            }
            KVXFER_RETURN_IF_ERROR(check(true));
            continue;
        }
        // Leading: read (blocking, one slice at a time) and act until nothing needs us.
        Status st;
        for (;;) {
            size_t got = 0;
            st = readInto(c, s, true, &got);
            if (st.isOk()) st = check(got == 0);
            bool handover = false;
            if (st.isOk() && got > 0) st = parseFrames(c, sp, true, check, &handover);
            if (st.isOk() && s.rx_len == s.rx.size())
                st = Status::peerUnreachable(c.label() + ": frame too large");
            std::lock_guard<std::mutex> lock(c.mutex);
            auto ignored = Clock::time_point::max();
            if (!st.isOk() || !receiverNeeded(s, Clock::now(), &ignored)) {
                s.reader = Reader::kNone;
                break;
            }
        }
        KVXFER_RETURN_IF_ERROR(st);
    }
}

// The waiting poster of an inline job reads the connection's frames itself while no
// other thread leads the read side: its ACK wakes only it.
// The caller spins for its ACK only while at most this many jobs are in flight on the
// connection: at queue depth 4-16 the spin gained 15-18%, at depth 64 it lost 5-10%.
constexpr size_t kSpinMaxInFlight = 32;

class InlineProgress final : public TransferJob::Progress {
public:
    void drive(TransferJob& job, Clock::time_point until) override {
        PeerConn& c = *static_cast<TcpPeer&>(*job.peer).conn;
        std::shared_ptr<Session> s;
        bool shallow = false;  // few jobs in flight on the connection: spin for the ACK
        {
            std::lock_guard<std::mutex> lock(c.mutex);
            s = c.session;
            if (!s || s->dead.load()) return;
            auto it = s->pending.find(job.id);
            if (it == s->pending.end()) return;
            if (s->reader != Reader::kNone) {
                // Another thread reads: this caller sleeps on the job instead, so the job
                // must not wait for a grace that nobody ends (the leader, when it lets go,
                // wakes the receiver for it).
                it->second.grace_until = {};
                return;
            }
            s->reader = Reader::kCaller;
            // With many jobs in flight ACKs keep coming anyway, and a sleeping reader takes
            // them in bigger batches than a polling one (measured: docs/benchmarks.md).
            shallow = s->pending.size() <= kSpinMaxInFlight;
        }
        Status st;
        auto check = [](bool) { return Status::ok(); };  // frames we parse need no socket reads
        // Until the job ends (its ACK, its deadline, or a cancel seen within one slice).
        bool spun = !shallow;
        while (job.state() == TransferState::kPending) {
            const auto now = Clock::now();
            // First a bounded busy-poll (spin.h): non-blocking reads until the ACK comes, the
            // spin budget or `until` ends, or the job or connection ends.
            if (!spun && until > now) {
                spun = true;
                if (const auto budget = c.caller_spin.next(); budget.count() > 0) {
                    const auto end = std::min(until, now + budget);
                    size_t got = 0;
                    for (;;) {
                        st = readInto(c, *s, false, &got);
                        if (!st.isOk() || got > 0 || job.terminal() ||
                            c.stopping.load(std::memory_order_relaxed) ||
                            s->dead.load(std::memory_order_relaxed) || Clock::now() >= end)
                            break;
                        spinPause();
                    }
                    c.caller_spin.result(got > 0);
                    if (!st.isOk()) break;
                    if (got > 0) {
                        bool handover = false;
                        st = parseFrames(c, s, false, check, &handover);
                        if (!st.isOk() || handover) break;
                        if (s->rx_len == s->rx.size()) break;
                    }
                    continue;
                }
            }
            // One recv that sleeps in the kernel until the peer answers (at most one slice,
            // SO_RCVTIMEO) when `until` is that far; else a look, then poll() to `until`.
            const auto left = std::chrono::ceil<std::chrono::milliseconds>(until - now).count();
            const bool block = left >= kPollSliceMs;
            size_t got = 0;
            st = readInto(c, *s, block, &got);
            if (!st.isOk()) break;
            if (got > 0) {
                bool handover = false;
                st = parseFrames(c, s, false, check, &handover);
                if (!st.isOk() || handover) break;
                if (s->rx_len == s->rx.size()) break;  // a frame too large for us: the receiver's
                continue;
            }
            if (block) continue;  // a slice passed: look at the job again
            if (left <= 0) break;
            pollfd p{s->fd.fd, POLLIN, 0};
            (void)::poll(&p, 1, static_cast<int>(left));
        }
        bool wake = false;
        {
            std::lock_guard<std::mutex> lock(c.mutex);
            s->reader = Reader::kNone;
            auto ignored = Clock::time_point::max();
            wake = receiverNeeded(*s, Clock::now(), &ignored);
        }
        if (!st.isOk()) killSession(c, *s, st);  // the receiver fails what is left
        if (wake || !st.isOk()) wakeReceiver(*s);
    }

    void release(TransferJob& job) override {
        PeerConn& c = *static_cast<TcpPeer&>(*job.peer).conn;
        std::shared_ptr<Session> s;
        {
            std::lock_guard<std::mutex> lock(c.mutex);
            s = c.session;
            if (!s) return;
            auto it = s->pending.find(job.id);
            if (it == s->pending.end()) return;
            it->second.grace_until = {};
        }
        wakeReceiver(*s);
    }
};

// Runs after the receive loop ended: the connection is dead; fail what the receiver owns.
void receiverSweep(PeerConn& c, Session& s) {
    std::vector<std::pair<std::shared_ptr<TransferJob>, Status>> finish;
    std::map<uint64_t, std::shared_ptr<NotifyWaiter>> waiters;
    Status why;
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        s.rx_done = true;
        why = s.death;
        for (auto it = s.pending.begin(); it != s.pending.end();) {
            if (it->second.streaming) {
                ++it;  // the sender finishes it when it lets go
            } else {
                finish.emplace_back(it->second.job, why);
                it = s.pending.erase(it);
            }
        }
        s.batches.clear();
        s.window = 0;
        waiters.swap(s.waiters);
    }
    c.cv.notify_all();
    for (auto& [seq, w] : waiters) w->complete(why);
    finishAll(finish);
}

}  // namespace

void wakeReceiver(Session& s) {
    const uint64_t one = 1;
    (void)!::write(s.wake.fd, &one, sizeof(one));
}

TransferJob::Progress& inlineProgress() {
    static InlineProgress progress;
    return progress;
}

Status startSession(const std::shared_ptr<PeerConn>& c, Fd fd) {
    auto s = std::make_shared<Session>();
    s->fd = std::move(fd);
    s->wake = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    std::lock_guard<std::mutex> lock(c->mutex);
    // Under the lock: stopConnection() either sees this session and breaks it, or this
    // sees `stopping`.
    if (c->stopping.load()) return Status::canceled(c->label() + ": connection closed");
    // A receiver that ends by itself (its session died) is joined by the group later.
    const bool started = c->threads->spawn([c, s] {
        Status why = receiverRun(*c, s);
        killSession(*c, *s, std::move(why));
        receiverSweep(*c, *s);
    });
    if (!started) return Status::canceled(c->label() + ": the engine is closing");
    c->session = s;
    return Status::ok();
}

}  // namespace kvxfer::tcp
