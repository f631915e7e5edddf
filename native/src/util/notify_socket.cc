#include "util/notify_socket.h"

#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

namespace kvxfer::notify_socket {
namespace {

sockaddr_un abstractAddress(const std::string& name, socklen_t* len) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    const size_t n = std::min(name.size(), sizeof(addr.sun_path) - 2);
    std::memcpy(addr.sun_path + 1, name.data(), n);
    *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
    return addr;
}

Status sendMessage(int fd, const Bytes& msg, const Protocol& p, int pass_fd = -1) {
    iovec iov{const_cast<uint8_t*>(msg.data()), msg.size()};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    if (pass_fd >= 0) {
        mh.msg_control = control;
        mh.msg_controllen = sizeof(control);
        cmsghdr* c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
    }
    for (;;) {
        const ssize_t k = ::sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k == static_cast<ssize_t>(msg.size())) return Status::ok();
        if (k < 0 && errno == EINTR) continue;
        return Status::systemErrno(p.backend + ": handshake send", k < 0 ? errno : EIO);
    }
}

// Receives one message by `deadline` (poll), with at most one passed fd.
Status recvMessage(int fd, Bytes* msg, Fd* passed, Clock::time_point deadline, const Protocol& p) {
    msg->resize(512);
    for (;;) {
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
        if (left <= 0) return Status::timeout(p.backend + ": handshake timed out");
        pollfd pfd{fd, POLLIN, 0};
        const int r = ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left, 1000)));
        if (r < 0 && errno != EINTR) return Status::systemErrno(p.backend + ": handshake poll", errno);
        if (r <= 0) continue;
        iovec iov{msg->data(), msg->size()};
        msghdr mh{};
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
        mh.msg_control = control;
        mh.msg_controllen = sizeof(control);
        const ssize_t k = ::recvmsg(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (k <= 0)
            return Status::peerUnreachable(p.backend + ": the peer closed its socket during the handshake");
        for (cmsghdr* c = CMSG_FIRSTHDR(&mh); c != nullptr; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int got = -1;
                std::memcpy(&got, CMSG_DATA(c), sizeof(int));
                if (passed != nullptr) {
                    *passed = Fd(got);
                } else {
                    ::close(got);  // not asked for
                }
            }
        }
        msg->resize(static_cast<size_t>(k));
        return Status::ok();
    }
}

}  // namespace

Bytes notificationMessage(ByteView payload) {
    Bytes msg(1 + payload.size());
    msg[0] = kNotifyMessage;
    if (!payload.empty()) std::memcpy(msg.data() + 1, payload.data(), payload.size());
    return msg;
}

// ---- the listener ------------------------------------------------------------------------

Result<std::shared_ptr<Listener>> Listener::start(ThreadGroup& threads, Protocol protocol,
                                                  const std::string& name, Bytes secret,
                                                  NotificationSink* sink, int welcome_fd,
                                                  std::shared_ptr<const void> owner) {
    std::shared_ptr<Listener> l(new Listener());
    l->protocol_ = std::move(protocol);
    l->name_ = name;
    l->secret_ = std::move(secret);
    l->sink_ = sink;
    l->welcome_fd_ = welcome_fd;
    l->owner_ = std::move(owner);
    const std::string& b = l->protocol_.backend;
    l->listen_fd_ = Fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    if (l->listen_fd_.fd < 0) return Status::systemErrno(b + ": socket(AF_UNIX)", errno);
    socklen_t len = 0;
    sockaddr_un addr = abstractAddress(name, &len);
    if (::bind(l->listen_fd_.fd, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
        return Status::systemErrno(b + ": bind notification socket @" + name, errno);
    }
    if (::listen(l->listen_fd_.fd, 128) != 0) return Status::systemErrno(b + ": listen", errno);
    l->stop_fd_ = Fd(::eventfd(0, EFD_CLOEXEC));
    l->room_fd_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    l->epoll_fd_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
    if (l->stop_fd_.fd < 0 || l->room_fd_.fd < 0 || l->epoll_fd_.fd < 0) {
        return Status::systemErrno(b + ": eventfd/epoll", errno);
    }
    for (int fd : {l->listen_fd_.fd, l->stop_fd_.fd, l->room_fd_.fd}) {
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.fd = fd;
        ::epoll_ctl(l->epoll_fd_.fd, EPOLL_CTL_ADD, fd, &ev);
    }
    // The thread holds the listener; stop() ends it.
    if (!threads.spawn([self = l] { self->run(); })) {
        return Status::canceled(b + ": the engine is closing");
    }
    return l;
}

void Listener::stop() {
    const uint64_t one = 1;
    (void)!::write(stop_fd_.fd, &one, sizeof(one));
}

void Listener::drop(int fd) {
    ::epoll_ctl(epoll_fd_.fd, EPOLL_CTL_DEL, fd, nullptr);
    ::close(fd);
    conns_.erase(fd);
}

void Listener::accept() {
    const int c = ::accept4(listen_fd_.fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (c < 0) return;
    ucred cred{};
    socklen_t len = sizeof(cred);
    // Only this user's processes; and a bounded number of connections.
    if (::getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.uid != ::geteuid() ||
        conns_.size() >= kMaxConnections) {
        ::close(c);
        return;
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = c;
    if (::epoll_ctl(epoll_fd_.fd, EPOLL_CTL_ADD, c, &ev) != 0) {
        ::close(c);
        return;
    }
    conns_[c] = Conn{};
}

bool Listener::onMessage(int fd, Conn& conn, const uint8_t* m, size_t k) {
    const uint32_t magic_expected = protocol_.magic;
    uint32_t magic = 0;
    switch (conn.state) {
        case Conn::kHello: {
            if (k < 4 + 8 + auth::kNonceBytes + 1 || k > 4 + 8 + auth::kNonceBytes + PeerDescriptor::kMaxName)
                return false;
            std::memcpy(&magic, m, 4);
            if (magic != magic_expected) return false;
            std::memcpy(&conn.instance, m + 4, 8);
            conn.theirs.assign(m + 12, m + 12 + auth::kNonceBytes);
            conn.name.assign(reinterpret_cast<const char*>(m + 12 + auth::kNonceBytes),
                             k - 12 - auth::kNonceBytes);
            auto nonce = auth::randomNonce();
            if (!nonce.isOk()) return false;
            conn.mine = *nonce;
            const auth::Mac ours =
                auth::mac(secret_, {auth::view(protocol_.targetLabel()), conn.theirs, auth::view(conn.mine)});
            Bytes reply(4);
            std::memcpy(reply.data(), &magic_expected, 4);
            reply.insert(reply.end(), conn.mine.begin(), conn.mine.end());
            reply.insert(reply.end(), ours.begin(), ours.end());
            conn.state = Conn::kProof;
            return sendMessage(fd, reply, protocol_).isOk();
        }
        case Conn::kProof: {
            if (k != 4 + auth::kMacBytes) return false;
            std::memcpy(&magic, m, 4);
            if (magic != magic_expected) return false;
            const auth::Mac expected =
                auth::mac(secret_, {auth::view(protocol_.initiatorLabel()), auth::view(conn.mine),
                                    conn.theirs, auth::view(conn.instance), auth::view(conn.name)});
            if (!auth::equal(auth::view(expected), ByteView(m + 4, auth::kMacBytes))) return false;
            Bytes welcome(4);
            std::memcpy(welcome.data(), &magic_expected, 4);
            conn.state = Conn::kOpen;
            return sendMessage(fd, welcome, protocol_, welcome_fd_).isOk();
        }
        case Conn::kOpen:
            if (k < 1 || m[0] != kNotifyMessage) return false;
            return offer(fd, conn, Bytes(m + 1, m + k));
    }
    return false;
}

bool Listener::offer(int fd, Conn& conn, Bytes payload) {
    Bytes copy = payload;  // deliver() consumes its argument even when it refuses
    Status st = sink_->deliver(conn.name, conn.instance, std::move(copy));
    if (st.isOk()) return true;
    if (st.code() != StatusCode::kBackPressure) return false;
    pause(fd, conn, std::move(payload));
    return true;
}

void Listener::pause(int fd, Conn& conn, Bytes payload) {
    conn.held = std::move(payload);
    epoll_event ev{};
    ev.data.fd = fd;
    ::epoll_ctl(epoll_fd_.fd, EPOLL_CTL_MOD, fd, &ev);  // no events: not read while held
    std::weak_ptr<Listener> self = weak_from_this();
    sink_->onRoom([self] {
        if (auto l = self.lock()) {
            const uint64_t one = 1;
            (void)!::write(l->room_fd_.fd, &one, sizeof(one));
        }
    });
}

void Listener::resumeHeld() {
    for (auto& [fd, conn] : conns_) {
        if (!conn.held) continue;
        Bytes copy = *conn.held;
        Status st = sink_->deliver(conn.name, conn.instance, std::move(copy));
        if (st.code() == StatusCode::kBackPressure) {
            pause(fd, conn, std::move(*conn.held));
            return;  // still full: wait for the next room
        }
        conn.held.reset();
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.fd = fd;
        ::epoll_ctl(epoll_fd_.fd, EPOLL_CTL_MOD, fd, &ev);
    }
}

void Listener::run() {
    std::vector<uint8_t> buf(kMaxMessage);
    epoll_event events[16];
    for (;;) {
        const int n = ::epoll_wait(epoll_fd_.fd, events, 16, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return;
        for (int i = 0; i < n; ++i) {
            const int fd = events[i].data.fd;
            if (fd == stop_fd_.fd) {
                for (auto& [c, conn] : conns_) ::close(c);
                conns_.clear();
                return;
            }
            if (fd == listen_fd_.fd) {
                accept();
                continue;
            }
            if (fd == room_fd_.fd) {
                uint64_t v = 0;
                (void)!::read(room_fd_.fd, &v, sizeof(v));
                resumeHeld();
                continue;
            }
            auto it = conns_.find(fd);
            if (it == conns_.end()) continue;
            for (;;) {
                const ssize_t k = ::recv(fd, buf.data(), buf.size(), 0);
                if (k < 0 && errno == EINTR) continue;
                if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
                if (k <= 0 || !onMessage(fd, it->second, buf.data(), static_cast<size_t>(k))) {
                    drop(fd);
                    break;
                }
                if (it->second.held) break;  // back-pressure: read no further
            }
        }
    }
}

// ---- the initiator -----------------------------------------------------------------------

Result<Fd> connect(const Protocol& p, const std::string& name, const PeerIdentity& peer,
                   uint64_t self_instance, const std::string& self_name, Clock::time_point deadline,
                   Fd* welcome_fd) {
    const std::string who = p.backend + " peer '" + peer.name + "'";
    if (peer.secret.size() != PeerDescriptor::kSecretBytes) {
        return Status::badDescriptor(who + " published no connection secret");
    }
    Fd sock(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (sock.fd < 0) return Status::systemErrno(p.backend + ": socket(AF_UNIX)", errno);
    socklen_t len = 0;
    sockaddr_un addr = abstractAddress(name, &len);
    if (::connect(sock.fd, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
        return Status::peerUnreachable(who + " notification socket: " + std::strerror(errno));
    }
    const int fd = sock.fd;
    KVXFER_ASSIGN_OR_RETURN(const auth::Nonce mine, auth::randomNonce());
    Bytes hello(4 + 8);
    std::memcpy(hello.data(), &p.magic, 4);
    std::memcpy(hello.data() + 4, &self_instance, 8);
    hello.insert(hello.end(), mine.begin(), mine.end());
    hello.insert(hello.end(), self_name.begin(), self_name.end());
    KVXFER_RETURN_IF_ERROR(sendMessage(fd, hello, p));
    Bytes msg;
    KVXFER_RETURN_IF_ERROR(recvMessage(fd, &msg, nullptr, deadline, p));
    uint32_t magic = 0;
    if (msg.size() != 4 + auth::kNonceBytes + auth::kMacBytes ||
        (std::memcpy(&magic, msg.data(), 4), magic != p.magic)) {
        return Status::peerUnreachable(who + ": malformed handshake");
    }
    const ByteView theirs(msg.data() + 4, auth::kNonceBytes);
    const auth::Mac expected =
        auth::mac(peer.secret, {auth::view(p.targetLabel()), auth::view(mine), theirs});
    if (!auth::equal(auth::view(expected), ByteView(msg.data() + 4 + auth::kNonceBytes, auth::kMacBytes))) {
        return Status::peerUnreachable(who + " could not prove its descriptor's secret");
    }
    const auth::Mac proof = auth::mac(peer.secret, {auth::view(p.initiatorLabel()), theirs, auth::view(mine),
                                                    auth::view(self_instance), auth::view(self_name)});
    Bytes out(4);
    std::memcpy(out.data(), &p.magic, 4);
    out.insert(out.end(), proof.begin(), proof.end());
    KVXFER_RETURN_IF_ERROR(sendMessage(fd, out, p));
    Fd passed;
    Status st = recvMessage(fd, &msg, &passed, deadline, p);
    if (!st.isOk() || msg.size() != 4 || (welcome_fd != nullptr && passed.fd < 0)) {
        return Status::peerUnreachable(who + " refused the connection" +
                                       (st.isOk() ? std::string() : ": " + st.message()));
    }
    if (welcome_fd != nullptr) *welcome_fd = std::move(passed);
    return sock;
}

Sent trySend(int fd, const Bytes& msg, const Protocol& p, const std::string& peer_name, Status* error) {
    for (;;) {
        const ssize_t k = ::send(fd, msg.data(), msg.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k == static_cast<ssize_t>(msg.size())) return Sent::kOk;
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return Sent::kNoRoom;
        if (k < 0 && (errno == EPIPE || errno == ECONNRESET || errno == ECONNREFUSED)) {
            *error = Status::peerUnreachable(p.backend + " peer '" + peer_name +
                                             "' closed its notification socket");
        } else {
            *error = Status::systemErrno(p.backend + " notification send to '" + peer_name + "'",
                                         k < 0 ? errno : EIO);
        }
        return Sent::kError;
    }
}

// ---- sending: Sender and Notifier ----------------------------------------------------------

std::optional<Status> Sender::sendForJob(const std::shared_ptr<TransferJob>& job) {
    return sendOrQueue({job, notificationMessage(job->notify), job->deadline, nullptr, nullptr});
}

Status Sender::send(ByteView payload, Clock::time_point deadline) {
    if (payload.size() + 1 > kMaxMessage) {
        return Status::invalidArgument("notification of " + std::to_string(payload.size()) +
                                       " bytes is too long");
    }
    Outgoing out{nullptr, notificationMessage(payload), deadline,
                 std::make_shared<std::pair<std::mutex, std::condition_variable>>(),
                 std::make_shared<std::optional<Status>>()};
    auto sync = out.sync;
    auto result = out.result;
    if (std::optional<Status> now = sendOrQueue(std::move(out))) return *now;
    // Queued: the notifier ends it by its deadline.
    std::unique_lock<std::mutex> lock(sync->first);
    sync->second.wait(lock, [&] { return result->has_value(); });
    return **result;
}

std::optional<Status> Sender::sendOrQueue(Outgoing out) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (outbox_.empty()) {
            Status error;
            const Sent sent = trySend(fd_.fd, out.msg, protocol_, peer_name_, &error);
            if (sent == Sent::kOk) return Status::ok();
            if (sent == Sent::kError) return error;
        }
        outbox_.push_back(std::move(out));
        if (outbox_.size() > 1) return std::nullopt;  // the notifier already watches this peer
    }
    notifier_->watch(shared_from_this());
    return std::nullopt;
}

bool Sender::drain(Clock::time_point now, Clock::time_point* next_deadline) {
    std::vector<std::pair<Outgoing, Status>> ended;
    bool empty = false;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        while (!outbox_.empty()) {
            Outgoing& head = outbox_.front();
            Status error;
            if (now >= head.deadline || (head.job && head.job->abandoned())) {
                error = Status::timeout(protocol_.backend + " peer '" + peer_name_ +
                                        "' did not take the notification by its deadline "
                                        "(its socket stayed full: the peer is stopped or slow)");
            } else if (trySend(fd_.fd, head.msg, protocol_, peer_name_, &error) == Sent::kNoRoom) {
                *next_deadline = std::min(*next_deadline, head.deadline);
                break;
            }
            ended.emplace_back(std::move(head), std::move(error));
            outbox_.pop_front();
        }
        empty = outbox_.empty();
    }
    for (auto& [out, st] : ended) complete(out, std::move(st));
    return empty;
}

void Sender::complete(Outgoing& out, Status st) {
    if (out.job) {
        out.job->finish(std::move(st));
        return;
    }
    {
        std::lock_guard<std::mutex> lock(out.sync->first);
        *out.result = std::move(st);
    }
    out.sync->second.notify_all();
}

void Sender::cancelAll(const Status& why) {
    std::deque<Outgoing> left;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        left.swap(outbox_);
    }
    for (auto& out : left) complete(out, why);
}

Notifier::Notifier() : wake_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}

std::shared_ptr<Notifier> Notifier::start(ThreadGroup& threads) {
    std::shared_ptr<Notifier> n(new Notifier());
    if (!threads.spawn([n] { n->run(); })) return nullptr;
    return n;
}

void Notifier::stop() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stopping_ = true;
    }
    wake();
}

void Notifier::watch(std::shared_ptr<Sender> sender) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!stopping_) {
            fresh_.push_back(std::move(sender));
            sender = nullptr;
        }
    }
    // Stopping: the thread may have returned already; nobody else would end these.
    if (sender) {
        sender->cancelAll(Status::canceled("the backend is closing"));
        return;
    }
    wake();
}

void Notifier::wake() {
    const uint64_t one = 1;
    (void)!::write(wake_.fd, &one, sizeof(one));
}

void Notifier::run() {
    std::vector<std::shared_ptr<Sender>> senders;
    std::vector<pollfd> fds;
    for (;;) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (stopping_) break;
            for (auto& s : fresh_) {
                if (std::find(senders.begin(), senders.end(), s) == senders.end())
                    senders.push_back(std::move(s));
            }
            fresh_.clear();
        }
        auto next = Clock::time_point::max();
        const auto now = Clock::now();
        std::erase_if(senders, [&](const auto& s) { return s->drain(now, &next); });
        fds.assign(1, pollfd{wake_.fd, POLLIN, 0});
        for (const auto& s : senders) fds.push_back({s->fd(), POLLOUT, 0});
        int timeout_ms = -1;
        if (next != Clock::time_point::max()) {
            const auto left = std::chrono::ceil<std::chrono::milliseconds>(next - Clock::now()).count();
            timeout_ms = static_cast<int>(std::clamp<int64_t>(left, 0, 60000));
        }
        ::poll(fds.data(), fds.size(), timeout_ms);
        uint64_t v = 0;
        (void)!::read(wake_.fd, &v, sizeof(v));
    }
    // Closing: end whatever is still queued.
    {
        std::lock_guard<std::mutex> lock(mutex_);
        for (auto& s : fresh_) senders.push_back(std::move(s));
        fresh_.clear();
    }
    for (auto& s : senders) s->cancelAll(Status::canceled("the backend is closing"));
}

}  // namespace kvxfer::notify_socket
