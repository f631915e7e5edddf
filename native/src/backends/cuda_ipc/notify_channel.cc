#include "backends/cuda_ipc/notify_channel.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>
#include <vector>

namespace kvxfer::cudaipc {
namespace {

constexpr size_t kMaxMessage = 64 * 1024 + 512;

sockaddr_un abstractAddress(const std::string& name, socklen_t* len) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    const size_t n = std::min(name.size(), sizeof(addr.sun_path) - 2);
    std::memcpy(addr.sun_path + 1, name.data(), n);
    *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
    return addr;
}

}  // namespace

Result<std::shared_ptr<NotifyListener>> NotifyListener::start(NotificationSink* sink,
                                                              const std::string& name) {
    auto l = std::make_shared<NotifyListener>();
    l->sink_ = sink;
    l->name_ = name;
    l->listen_fd_ = Fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    if (l->listen_fd_.fd < 0) return Status::systemErrno("cuda_ipc: socket(AF_UNIX)", errno);
    socklen_t len = 0;
    sockaddr_un addr = abstractAddress(name, &len);
    if (::bind(l->listen_fd_.fd, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
        return Status::systemErrno("cuda_ipc: bind notification socket @" + name, errno);
    }
    if (::listen(l->listen_fd_.fd, 128) != 0) return Status::systemErrno("cuda_ipc: listen", errno);
    l->stop_fd_ = Fd(::eventfd(0, EFD_CLOEXEC));
    l->epoll_fd_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
    if (l->stop_fd_.fd < 0 || l->epoll_fd_.fd < 0)
        return Status::systemErrno("cuda_ipc: eventfd/epoll", errno);
    for (int fd : {l->listen_fd_.fd, l->stop_fd_.fd}) {
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.fd = fd;
        ::epoll_ctl(l->epoll_fd_.fd, EPOLL_CTL_ADD, fd, &ev);
    }
    NotifyListener* raw = l.get();
    l->thread_ = std::thread([raw] { raw->run(); });
    return l;
}

void NotifyListener::stop() {
    const uint64_t one = 1;
    (void)::write(stop_fd_.fd, &one, sizeof(one));
    if (!thread_.joinable()) return;
    if (thread_.get_id() == std::this_thread::get_id()) {
        thread_.detach();
    } else {
        thread_.join();
    }
}

void NotifyListener::run() {
    std::vector<uint8_t> buf(kMaxMessage);
    epoll_event events[16];
    for (;;) {
        const int n = ::epoll_wait(epoll_fd_.fd, events, 16, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return;
        for (int i = 0; i < n; ++i) {
            const int fd = events[i].data.fd;
            if (fd == stop_fd_.fd) return;
            if (fd == listen_fd_.fd) {
                const int c = ::accept4(listen_fd_.fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
                if (c >= 0) {
                    epoll_event ev{};
                    ev.events = EPOLLIN;
                    ev.data.fd = c;
                    ::epoll_ctl(epoll_fd_.fd, EPOLL_CTL_ADD, c, &ev);
                }
                continue;
            }
            for (;;) {
                const ssize_t k = ::recv(fd, buf.data(), buf.size(), 0);
                if (k < 0 && errno == EINTR) continue;
                if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
                if (k <= 0) {
                    ::epoll_ctl(epoll_fd_.fd, EPOLL_CTL_DEL, fd, nullptr);
                    ::close(fd);
                    break;
                }
                if (k < 10) continue;  // malformed
                uint64_t instance = 0;
                uint16_t name_len = 0;
                std::memcpy(&instance, buf.data(), 8);
                std::memcpy(&name_len, buf.data() + 8, 2);
                if (10u + name_len > static_cast<size_t>(k)) continue;
                std::string name(reinterpret_cast<char*>(buf.data() + 10), name_len);
                (void)sink_->deliver(std::move(name), instance,
                                     Bytes(buf.begin() + 10 + name_len, buf.begin() + k));
            }
        }
    }
}

Result<std::unique_ptr<NotifySender>> NotifySender::connect(const std::string& name,
                                                            const std::string& peer_name,
                                                            const std::string& self_name,
                                                            uint64_t self_instance) {
    auto s = std::make_unique<NotifySender>();
    s->peer_name_ = peer_name;
    s->self_name_ = self_name;
    s->self_instance_ = self_instance;
    s->fd_ = Fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    if (s->fd_.fd < 0) return Status::systemErrno("cuda_ipc: socket(AF_UNIX)", errno);
    socklen_t len = 0;
    sockaddr_un addr = abstractAddress(name, &len);
    if (::connect(s->fd_.fd, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
        return Status::peerUnreachable("cuda_ipc peer '" + peer_name +
                                       "' notification socket: " + std::strerror(errno));
    }
    return s;
}

Status NotifySender::send(ByteView payload) {
    if (payload.size() + 10 + self_name_.size() > kMaxMessage) {
        return Status::invalidArgument("notification of " + std::to_string(payload.size()) +
                                       " bytes is too long");
    }
    Bytes msg(10 + self_name_.size() + payload.size());
    std::memcpy(msg.data(), &self_instance_, 8);
    const uint16_t n = static_cast<uint16_t>(self_name_.size());
    std::memcpy(msg.data() + 8, &n, 2);
    std::memcpy(msg.data() + 10, self_name_.data(), self_name_.size());
    if (!payload.empty()) std::memcpy(msg.data() + 10 + self_name_.size(), payload.data(), payload.size());
    std::lock_guard<std::mutex> lock(mutex_);
    for (;;) {
        const ssize_t k = ::send(fd_.fd, msg.data(), msg.size(), MSG_NOSIGNAL);
        if (k == static_cast<ssize_t>(msg.size())) return Status::ok();
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && (errno == EPIPE || errno == ECONNRESET || errno == ECONNREFUSED)) {
            return Status::peerUnreachable("cuda_ipc peer '" + peer_name_ +
                                           "' closed its notification socket");
        }
        return Status::systemErrno("cuda_ipc notification send to '" + peer_name_ + "'", k < 0 ? errno : EIO);
    }
}

}  // namespace kvxfer::cudaipc
