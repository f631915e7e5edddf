// TCP backend, initiator side: the hand-offs of a job between the sender and the receiver
// of a connection (who finishes it), killing a session, and the teardown of a connection
// when its TcpPeer goes.
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "backends/tcp/tcp_internal.h"

namespace kvxfer::tcp {

void finishAll(std::vector<std::pair<std::shared_ptr<TransferJob>, Status>>& list) {
    for (auto& [job, st] : list) job->finish(std::move(st));
    list.clear();  // drops the references outside any lock
}

namespace {

// Aborts a connection with a RST: what is still queued in our send buffer is dropped
// instead of reaching the peer after we gave up on it (connect(AF_UNSPEC) disconnects a
// TCP socket without closing the descriptor other threads may be using). Another thread
// may be inside send or recv on it (close() stops a connection while a caller sends
// inline); the kernel serialises both on the socket. The raw syscall keeps ThreadSanitizer
// out of it: its connect() interceptor models the descriptor as created anew, which a
// concurrent send then reports as a race, while the descriptor stays the same.
void resetConnection(int fd) {
    sockaddr sa{};
    sa.sa_family = AF_UNSPEC;
    (void)::syscall(SYS_connect, fd, &sa, sizeof(sa));
    ::shutdown(fd, SHUT_RDWR);
}

}  // namespace

// Marks the session dead and breaks the socket; the receiver then fails what it owns.
void killSession(PeerConn& c, Session& s, Status why) {
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        if (s.dead.load()) return;
        if (why.isOk()) why = Status::peerUnreachable(c.label() + ": connection closed");
        s.death = std::move(why);
        s.dead.store(true);
    }
    resetConnection(s.fd.fd);
    c.cv.notify_all();
}

// Decides the end of a READ whose requests are all sent and answered. Under c.mutex;
// fills `finish` or queues the notification.
void completeRead(PeerConn& c, const std::shared_ptr<Session>& s, std::map<uint64_t, Pending>::iterator it,
                  std::vector<std::pair<std::shared_ptr<TransferJob>, Status>>& finish) {
    Pending& p = it->second;
    auto job = p.job;
    Status finish_with;
    if (job->decideAfterData(p.error, !p.stopped_early, &finish_with) == TransferJob::AfterData::kFinished) {
        finish.emplace_back(job, std::move(finish_with));
    } else {
        p.committed = true;
        p.awaiting_ack = true;
        c.commits.push_back({SendItem::kCommit, job, s, nullptr});
        c.cv.notify_all();
        return;
    }
    s->pending.erase(it);
}

// The sender lets go of a job it was streaming.
void releaseStreaming(PeerConn& c, const std::shared_ptr<Session>& s, uint64_t id, bool stopped_early,
                      Status error) {
    std::vector<std::pair<std::shared_ptr<TransferJob>, Status>> finish;
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        auto it = s->pending.find(id);
        if (it == s->pending.end()) return;
        Pending& p = it->second;
        p.streaming = false;
        if (!error.isOk() && p.error.isOk()) p.error = std::move(error);
        p.stopped_early = stopped_early;
        if (s->rx_done) {
            finish.emplace_back(p.job, s->death);
            s->pending.erase(it);
        } else if (p.job->op == Op::kWrite) {
            p.awaiting_ack = !stopped_early;
            if (p.acked) {  // the ACK overtook us (inline path)
                finish.emplace_back(p.job, error.isOk() ? std::move(p.ack_status) : p.error);
                s->pending.erase(it);
            } else if (stopped_early) {
                finish.emplace_back(p.job, Status::canceled("tcp: write abandoned"));
                s->pending.erase(it);
            }
        } else if (p.reads_outstanding == 0) {
            completeRead(c, s, it, finish);
        }
    }
    finishAll(finish);
}

void stopConnection(PeerConn& c) {
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        c.stopping.store(true);
        if (c.session) ::shutdown(c.session->fd.fd, SHUT_RDWR);
    }
    c.cv.notify_all();
}

// The connection's threads are told to stop, not joined here: the destructor may run
// under the Python GIL (the user dropped the last Peer) while one of these threads is
// still releasing its last reference to a finished job, whose Region may in turn release
// a Python buffer and wait for the GIL: a join would deadlock. The threads hold the
// PeerConn (never the backend), exit within one poll slice, and are joined by the
// engine's ThreadGroup (Engine::close()).
TcpPeer::~TcpPeer() { stopConnection(*conn); }

}  // namespace kvxfer::tcp
