// TCP backend, initiator side: the sender thread of a connection, the only writer of its
// socket. It streams WRITE frames straight from registered memory and END, issues READ_REQ
// frames within the read window, sends READ commits (notifications) and NOTIFY frames.
#include <optional>

#include "backends/tcp/tcp_internal.h"

namespace kvxfer::tcp {
namespace {

// The sender's check for one frame: gives up when the connection breaks, or when the
// peer stops reading while the job (or notification) it belongs to is abandoned.
class SendCheck {
public:
    SendCheck(PeerConn& c, Session& s, std::function<bool()> given_up)
        : c_(c), s_(s), given_up_(std::move(given_up)) {}
    Status operator()(bool idle) {
        if (c_.stopping.load()) return Status::canceled(c_.label() + ": connection closed");
        if (s_.dead.load()) return Status::peerUnreachable(c_.label() + ": connection lost");
        if (!idle) {
            idle_since_.reset();
            return Status::ok();
        }
        const auto now = Clock::now();
        if (!idle_since_) idle_since_ = now;
        if (now - *idle_since_ > kStallGrace && given_up_()) {
            return Status::peerUnreachable(c_.label() + " stopped reading (transfer abandoned mid-frame)");
        }
        return Status::ok();
    }

private:
    PeerConn& c_;
    Session& s_;
    std::function<bool()> given_up_;
    std::optional<Clock::time_point> idle_since_;
};

// Runs [first, end) of a job's flattened runs that fit one frame: one remote region (the
// frame names its tag), at most kMaxBatchRuns runs and kMaxBatchBytes bytes.
uint64_t batchEnd(const TransferJob& job, uint64_t first, uint64_t* bytes) {
    const uint32_t part = job.partOf(first);
    const uint64_t n = part + 1 < job.parts.size() ? job.parts[part + 1].first_run : job.num_runs;
    uint64_t end = first;
    *bytes = 0;
    while (end < n && end - first < kMaxBatchRuns) {
        const uint64_t len = job.run(end).length;
        if (end > first && *bytes + len > kMaxBatchBytes) break;
        *bytes += len;
        ++end;
    }
    return end;
}

uint64_t regionTag(const TransferJob& job, uint64_t run) {
    return static_cast<const TcpRemoteRegion*>(job.parts[job.partOf(run)].remote.backend)->tag;
}

void appendTable(std::vector<uint8_t>& out, const TransferJob& job, uint64_t first, uint64_t end) {
    const size_t at = out.size();
    out.resize(at + 16 * (end - first));
    uint8_t* p = out.data() + at;
    for (uint64_t i = first; i < end; ++i, p += 16) {
        const FlatRun r = job.run(i);
        putLe(p, r.remote_address, 8);
        putLe(p + 8, r.length, 8);
    }
}

void sendCommit(PeerConn& c, const SendItem& item);

// Sends the READ notifications that became ready while a long job streams, so that they
// do not wait for its end.
void flushCommits(PeerConn& c) {
    for (;;) {
        SendItem item;
        {
            std::lock_guard<std::mutex> lock(c.mutex);
            if (c.commits.empty()) return;
            item = std::move(c.commits.front());
            c.commits.pop_front();
        }
        sendCommit(c, item);
    }
}

void streamWrite(PeerConn& c, const std::shared_ptr<Session>& s, const std::shared_ptr<TransferJob>& job) {
    const uint64_t n = job->num_runs;
    const int fd = s->fd.fd;
    SendCheck check(c, *s, [&] { return job->abandoned(); });
    std::vector<uint8_t> head;
    IovCursor cur;
    uint64_t i = 0;
    bool sent_any = false;
    Status st;
    while (i < n && st.isOk()) {
        if (job->abandoned()) break;
        uint64_t bytes = 0;
        const uint64_t end = batchEnd(*job, i, &bytes);
        head.assign(kHeaderBytes, 0);
        encodeHeader({.type = kWrite,
                      .aux = static_cast<uint32_t>(end - i),
                      .job = job->id,
                      .a = regionTag(*job, i),
                      .b = bytes},
                     head.data());
        appendTable(head, *job, i, end);
        cur.clear();
        cur.add(head.data(), head.size());
        for (uint64_t k = i; k < end; ++k) {
            const FlatRun r = job->run(k);
            cur.add(r.local, r.length);
        }
        st = moveAll(fd, true, cur, check, "tcp send");
        sent_any = true;
        i = end;
        if (st.isOk() && i < n) flushCommits(c);
    }
    if (!st.isOk()) {
        killSession(c, *s, st);
        releaseStreaming(c, s, job->id, false, st);
        return;
    }
    uint32_t flags = 0;
    bool stopped_early = i < n;
    if (!stopped_early && !job->notify.empty()) {
        if (job->commitNow()) {
            flags = kEndNotify;
            std::lock_guard<std::mutex> lock(c.mutex);
            if (auto it = s->pending.find(job->id); it != s->pending.end()) it->second.committed = true;
        } else {
            stopped_early = true;
        }
    }
    if (stopped_early && !sent_any) {
        releaseStreaming(c, s, job->id, true);
        return;
    }
    head.clear();
    const uint64_t nb = flags ? job->notify.size() : 0;
    appendFrame(head, {.type = kEnd, .aux = stopped_early ? kEndAbort : flags, .job = job->id, .b = nb},
                job->notify.data(), nb);
    // Local memory is no longer touched: hand the job to the receiver before the ACK can come.
    releaseStreaming(c, s, job->id, stopped_early);
    SendCheck end_check(c, *s, [&] { return Clock::now() > job->deadline; });
    st = sendBytes(fd, head.data(), head.size(), end_check, "tcp send");
    if (!st.isOk()) killSession(c, *s, st);
}

void streamRead(PeerConn& c, const std::shared_ptr<Session>& s, const std::shared_ptr<TransferJob>& job) {
    const uint64_t n = job->num_runs;
    const int fd = s->fd.fd;
    SendCheck check(c, *s, [&] { return job->abandoned(); });
    std::vector<uint8_t> head;
    uint64_t i = 0;
    Status st;
    while (i < n) {
        if (job->abandoned()) break;
        uint64_t bytes = 0;
        const uint64_t end = batchEnd(*job, i, &bytes);
        {
            std::unique_lock<std::mutex> lock(c.mutex);
            while (s->window > 0 && s->window + bytes > kReadWindowBytes && !s->dead.load() &&
                   !c.stopping.load() && !job->abandoned()) {
                c.cv.wait_for(lock, std::chrono::milliseconds(kPollSliceMs));
            }
            if (s->dead.load() || c.stopping.load()) {
                st = Status::peerUnreachable(c.label() + ": connection lost");
                break;
            }
            if (job->abandoned()) break;
            s->batches.push_back({job->id, i, end, bytes});
            s->window += bytes;
            ++s->pending.at(job->id).reads_outstanding;
        }
        head.assign(kHeaderBytes, 0);
        encodeHeader({.type = kReadReq,
                      .aux = static_cast<uint32_t>(end - i),
                      .job = job->id,
                      .a = regionTag(*job, i),
                      .b = bytes},
                     head.data());
        appendTable(head, *job, i, end);
        st = sendBytes(fd, head.data(), head.size(), check, "tcp send");
        if (!st.isOk()) break;
        i = end;
        flushCommits(c);
    }
    if (!st.isOk()) killSession(c, *s, st);
    releaseStreaming(c, s, job->id, i < n, st);
}

void sendCommit(PeerConn& c, const SendItem& item) {
    Session& s = *item.session;
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        if (s.dead.load() || !s.pending.count(item.job->id)) return;  // the receiver fails it
    }
    std::vector<uint8_t> frame;
    appendFrame(frame, {.type = kEnd, .aux = kEndNotify, .job = item.job->id, .b = item.job->notify.size()},
                item.job->notify.data(), item.job->notify.size());
    const auto deadline = item.job->deadline;
    SendCheck check(c, s, [deadline] { return Clock::now() > deadline; });
    Status st = sendBytes(s.fd.fd, frame.data(), frame.size(), check, "tcp send");
    if (!st.isOk()) killSession(c, s, st);
}

void runJob(const std::shared_ptr<PeerConn>& c, const std::shared_ptr<TransferJob>& job) {
    if (job->abandoned()) {
        job->finish(Status::canceled("tcp: transfer abandoned before it started"));
        return;
    }
    auto s = acquire(
        c, job->deadline, [&] { return job->abandoned(); },
        [&](Session& session) {
            Pending p;
            p.job = job;
            session.pending.emplace(job->id, std::move(p));
            wakeReceiver(session);  // it reads this job's answers
        });
    if (!s.isOk()) {
        job->finish(s.status());
        return;
    }
    if (job->op == Op::kWrite) {
        streamWrite(*c, *s, job);
    } else {
        streamRead(*c, *s, job);
    }
}

void runNotify(const std::shared_ptr<PeerConn>& c, const std::shared_ptr<NotifyWaiter>& w) {
    if (Clock::now() >= w->deadline) {
        w->complete(Status::timeout(c->label() + ": notification not sent before its deadline"));
        return;
    }
    uint64_t seq = 0;
    auto s = acquire(
        c, w->deadline, [&] { return Clock::now() >= w->deadline; },
        [&](Session& session) {
            seq = c->next_notify_seq++;
            session.waiters[seq] = w;
            wakeReceiver(session);
        });
    if (!s.isOk()) {
        w->complete(s.status());
        return;
    }
    std::vector<uint8_t> frame;
    appendFrame(frame, {.type = kNotify, .job = seq, .b = w->payload.size()}, w->payload.data(),
                w->payload.size());
    SendCheck check(*c, **s, [&] { return Clock::now() > w->deadline; });
    Status st = sendBytes((*s)->fd.fd, frame.data(), frame.size(), check, "tcp send");
    if (!st.isOk()) killSession(*c, **s, st);  // the sweep completes the waiter
}

}  // namespace

void senderLoop(const std::shared_ptr<PeerConn>& c) {
    for (;;) {
        SendItem item;
        {
            std::unique_lock<std::mutex> lock(c->mutex);
            c->writing = false;
            c->cv.wait(lock, [&] {
                return c->stopping.load() || (!c->writing && (!c->commits.empty() || !c->queue.empty()));
            });
            if (c->stopping.load()) break;
            auto& q = c->commits.empty() ? c->queue : c->commits;
            item = std::move(q.front());
            q.pop_front();
            c->writing = true;
        }
        switch (item.kind) {
            case SendItem::kJob:
                runJob(c, item.job);
                break;
            case SendItem::kCommit:
                sendCommit(*c, item);
                break;
            case SendItem::kNotifyItem:
                runNotify(c, item.waiter);
                break;
        }
        item = {};
    }
    // Stopped (the engine is closing, or the TcpPeer went): what is still queued ends here.
    // A queued commit's job is in its session's pending map: the receiver ends it when the
    // broken session's sweep runs.
    std::deque<SendItem> left;
    {
        std::lock_guard<std::mutex> lock(c->mutex);
        left.swap(c->queue);
        c->commits.clear();
    }
    for (auto& item : left) {
        const Status closed = Status::canceled(c->label() + ": connection closed");
        if (item.kind == SendItem::kJob) item.job->dataDone(closed, false);
        if (item.waiter) item.waiter->complete(closed);
    }
}

bool sendInline(const std::shared_ptr<PeerConn>& c, const std::shared_ptr<TransferJob>& job) {
    // One WRITE frame names one region tag: a job over several regions takes the sender.
    if (job->op != Op::kWrite || job->num_runs > kInlineMaxRuns || job->parts.size() != 1) return false;
    std::shared_ptr<Session> s;
    {
        std::lock_guard<std::mutex> lock(c->mutex);
        if (c->stopping.load() || c->writing || !c->queue.empty() || !c->commits.empty() || !c->session ||
            c->session->dead.load())
            return false;
        s = c->session;
        Pending p;
        p.job = job;
        p.inline_job = true;  // its waiter reads the ACK (inlineProgress)
        p.grace_until = Clock::now() + kCallerGrace;
        s->pending.emplace(job->id, std::move(p));
        c->writing = true;
    }
    job->progress = &inlineProgress();
    auto letGo = [&] {
        bool queued = false;
        {
            std::lock_guard<std::mutex> lock(c->mutex);
            c->writing = false;
            queued = !c->queue.empty() || !c->commits.empty();
        }
        // Only when work was queued meanwhile: waking the idle sender for nothing cost a
        // futex round trip and a context switch per request.
        if (queued) c->cv.notify_all();
    };
    // One WRITE frame (header + run table), the payloads, and END (with the notification),
    // in one sendmsg: the target wakes once and the bytes leave in as few segments as fit.
    const uint64_t n = job->num_runs;
    uint8_t head[kHeaderBytes + 16 * kInlineMaxRuns];
    uint8_t end[kHeaderBytes];
    iovec iov[kInlineMaxRuns + 3];
    size_t k = 0;
    uint64_t bytes = 0;
    for (uint64_t i = 0; i < n; ++i) {
        const FlatRun r = job->run(i);
        putLe(head + kHeaderBytes + 16 * i, r.remote_address, 8);
        putLe(head + kHeaderBytes + 16 * i + 8, r.length, 8);
        iov[1 + i] = {r.local, r.length};
        bytes += r.length;
    }
    if (n > 0) {
        encodeHeader({.type = kWrite,
                      .aux = static_cast<uint32_t>(n),
                      .job = job->id,
                      .a = regionTag(*job, 0),
                      .b = bytes},
                     head);
        iov[0] = {head, kHeaderBytes + 16 * n};
        k = 1 + n;
    }
    uint32_t flags = 0;
    if (!job->notify.empty()) {
        // The END goes with the data: commit first. After a failed commit (deadline passed,
        // canceled) nothing is sent and the job ends as abandoned.
        if (!job->commitNow()) {
            letGo();
            releaseStreaming(*c, s, job->id, true);
            return true;
        }
        flags = kEndNotify;
        std::lock_guard<std::mutex> lock(c->mutex);
        if (auto it = s->pending.find(job->id); it != s->pending.end()) it->second.committed = true;
    }
    const uint64_t nb = flags ? job->notify.size() : 0;
    encodeHeader({.type = kEnd, .aux = flags, .job = job->id, .b = nb}, end);
    iov[k++] = {end, kHeaderBytes};
    if (nb) iov[k++] = {const_cast<uint8_t*>(job->notify.data()), nb};
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = k;
    ssize_t sent = ::sendmsg(s->fd.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (sent < 0 && errno == EINTR) sent = ::sendmsg(s->fd.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    Status st;
    if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && flags == 0) {
        // The socket is full (the target is behind): queue it behind the others instead.
        {
            std::lock_guard<std::mutex> lock(c->mutex);
            s->pending.erase(job->id);
        }
        job->progress = nullptr;
        letGo();
        return false;
    }
    if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        const int err = errno;
        st = Status::peerUnreachable(c->label() + ": tcp send: " + errnoText(err));
    } else {
        // Partly sent (or full after a commit): finish the frames, bounded like the sender's.
        IovCursor cur;
        for (size_t i = 0; i < k; ++i) cur.add(iov[i].iov_base, iov[i].iov_len);
        if (sent > 0) cur.advance(static_cast<size_t>(sent));
        if (!cur.empty()) {
            SendCheck check(*c, *s, [&] { return job->abandoned() || Clock::now() > job->deadline; });
            st = moveAll(s->fd.fd, true, cur, check, "tcp send");
        }
    }
    letGo();
    if (!st.isOk()) killSession(*c, *s, st);
    releaseStreaming(*c, s, job->id, false, st);
    return true;
}

}  // namespace kvxfer::tcp
