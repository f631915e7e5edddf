// TCP backend, initiator side: the receiver thread of a session. It reads ACK, NOTIFY_ACK and
// READ_DATA frames (READ data straight into local memory), scans for abandoned writes and
// stalled peers, and fails what it owns once the connection is dead.
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

Status readMessage(int fd, uint64_t n, std::string* out, const std::function<Status(bool)>& check) {
    if (n > kMaxMessageBytes)
        return Status::peerUnreachable("tcp: malformed frame from peer (message too long)");
    out->assign(n, '\0');
    return recvBytes(fd, out->data(), n, check, "tcp receive");
}

Status receiverRun(PeerConn& c, const std::shared_ptr<Session>& sp) {
    Session& s = *sp;
    const int fd = s.fd.fd;
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
    const std::string what = "tcp connection to peer '" + c.peer_name + "'";
    auto malformed = [&](const char* why) {
        return Status::peerUnreachable(what + ": malformed frame (" + why + ")");
    };
    uint8_t hb[kHeaderBytes];
    std::string msg;
    std::vector<std::pair<std::shared_ptr<TransferJob>, Status>> finish;
    IovCursor cur;
    for (;;) {
        KVXFER_RETURN_IF_ERROR(recvBytes(fd, hb, sizeof(hb), check, what.c_str()));
        Header h;
        if (!decodeHeader(hb, &h)) return malformed("bad magic or version");
        switch (h.type) {
            case kAck: {
                KVXFER_RETURN_IF_ERROR(readMessage(fd, h.b, &msg, check));
                {
                    std::lock_guard<std::mutex> lock(c.mutex);
                    auto it = s.pending.find(h.job);
                    // Absent: abandoned and already finished.
                    if (it != s.pending.end() && it->second.awaiting_ack) {
                        finish.emplace_back(it->second.job,
                                            h.aux == 0 ? Status::ok() : statusFromWire(h.aux, msg));
                        s.pending.erase(it);
                    } else if (it != s.pending.end() && it->second.streaming) {
                        // The inline path sent WRITE and END in one call and has not let go
                        // yet: releaseStreaming() finishes it with this outcome.
                        it->second.acked = true;
                        it->second.ack_status = h.aux == 0 ? Status::ok() : statusFromWire(h.aux, msg);
                    }
                }
                finishAll(finish);
                break;
            }
            case kNotifyAck: {
                KVXFER_RETURN_IF_ERROR(readMessage(fd, h.b, &msg, check));
                std::shared_ptr<NotifyWaiter> w;
                {
                    std::lock_guard<std::mutex> lock(c.mutex);
                    if (auto it = s.waiters.find(h.job); it != s.waiters.end()) {
                        w = std::move(it->second);
                        s.waiters.erase(it);
                    }
                }
                if (w) w->complete(h.aux == 0 ? Status::ok() : statusFromWire(h.aux, msg));
                break;
            }
            case kReadData: {
                ReadBatch batch{};
                std::shared_ptr<TransferJob> job;
                {
                    std::lock_guard<std::mutex> lock(c.mutex);
                    if (s.batches.empty() || s.batches.front().job != h.job)
                        return malformed("unexpected READ_DATA");
                    batch = s.batches.front();
                    s.batches.pop_front();
                    auto it = s.pending.find(h.job);
                    if (it == s.pending.end()) return malformed("READ_DATA for an unknown job");
                    job = it->second.job;
                }
                Status result;
                if (h.aux != 0) {
                    KVXFER_RETURN_IF_ERROR(readMessage(fd, h.b, &msg, check));
                    result = statusFromWire(h.aux, msg);
                } else {
                    if (h.b != batch.bytes) return malformed("READ_DATA length differs from the request");
                    cur.clear();
                    for (uint64_t i = batch.first; i < batch.end; ++i) {
                        const FlatRun r = job->run(i);
                        cur.add(r.local, r.length);
                    }
                    KVXFER_RETURN_IF_ERROR(moveAll(fd, false, cur, check, what.c_str()));
                }
                {
                    std::lock_guard<std::mutex> lock(c.mutex);
                    s.window -= batch.bytes;
                    auto it = s.pending.find(h.job);
                    if (it != s.pending.end()) {
                        Pending& p = it->second;
                        --p.reads_outstanding;
                        if (!result.isOk() && p.error.isOk()) p.error = result;
                        if (!p.streaming && p.reads_outstanding == 0) completeRead(c, sp, it, finish);
                    }
                }
                c.cv.notify_all();
                job.reset();
                finishAll(finish);
                break;
            }
            default:
                return malformed("unknown frame type");
        }
    }
}

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

void startSession(const std::shared_ptr<PeerConn>& c, Fd fd) {
    auto s = std::make_shared<Session>();
    s->fd = std::move(fd);
    std::lock_guard<std::mutex> lock(c->mutex);
    c->session = s;
    c->receivers.emplace_back([c, s] {
        Status why = receiverRun(*c, s);
        killSession(*c, *s, std::move(why));
        receiverSweep(*c, *s);
        // Done with this session: detach ourselves (no one needs to join a finished receiver).
        std::lock_guard<std::mutex> lock(c->mutex);
        const auto self = std::this_thread::get_id();
        for (auto it = c->receivers.begin(); it != c->receivers.end(); ++it) {
            if (it->get_id() == self) {
                it->detach();
                c->receivers.erase(it);
                break;
            }
        }
    });
}

}  // namespace kvxfer::tcp
