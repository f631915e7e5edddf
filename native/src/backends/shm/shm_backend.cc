// Shared-memory backend for engines on one host: one copy, straight between the two
// processes' registered buffers, by one of two mechanisms chosen per remote region:
// - the peer's region lies in a kvxfer HostBuffer (memfd): the initiator takes a copy
//   of the peer's memfd with pidfd_getfd, maps it, and copies in user space
//   (util/fast_copy.h: streaming stores for runs of 32 KiB and more). The fast path.
// - any other memory (a numpy array, a torch tensor): Linux cross-memory attach
//   (process_vm_writev / process_vm_readv), 1024 (local, remote) iovec pairs per system
//   call. Slower for large runs (the kernel copy has no non-temporal stores) but it
//   needs no allocator of ours. docs/shm.md has the measurements behind the choice.
//
// Notifications travel over a SOCK_SEQPACKET Unix socket in the abstract namespace,
// sent by the copy worker after the last chunk's syscall returned, i.e. after the bytes
// are in the target's memory. Peer liveness: a pidfd, polled before every chunk, so a
// dead peer (or a recycled pid) fails the transfer instead of writing elsewhere.
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

#include "backends/factories.h"
#include "kvxfer/config.h"
#include "kvxfer/host_memory.h"
#include "util/copy_pool.h"
#include "util/fast_copy.h"
#include "util/scoped_fd.h"

namespace kvxfer {
namespace {

constexpr size_t kMaxIov = 1024;  // UIO_MAXIOV
constexpr size_t kMaxMessage = 64 * 1024 + 512;
// The inline path (the posting thread copies; ShmConfig::inline_max_bytes, 64 KiB by
// default: below it a copy costs less than handing the job to a copy thread and waking the
// caller; docs/benchmarks.md, Latency) takes jobs of at most this many runs.
constexpr uint64_t kInlineMaxRuns = 64;

uint64_t processStartTime(pid_t pid) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    if (!std::getline(f, line)) return 0;
    const auto close = line.rfind(')');
    if (close == std::string::npos) return 0;
    std::istringstream rest(line.substr(close + 2));
    std::string field;
    // Fields after the command name start at 3 (state); starttime is field 22.
    for (int i = 3; i <= 22 && rest >> field; ++i) {
        if (i == 22) return std::stoull(field);
    }
    return 0;
}

std::string socketName(uint64_t instance) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "kvxfer-shm-%016llx", static_cast<unsigned long long>(instance));
    return buf;
}

sockaddr_un abstractAddress(const std::string& name, socklen_t* len) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path + 1, name.data(), std::min(name.size(), sizeof(addr.sun_path) - 2));
    *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
    return addr;
}

struct ShmPeer : BackendPeer {
    std::string name;
    pid_t pid = 0;
    Fd pidfd;
    std::mutex send_mutex;
    Fd notify_socket;
    std::string self_name;
    uint64_t self_instance = 0;

    bool exited() const {
        pollfd p{pidfd.fd, POLLIN, 0};
        return ::poll(&p, 1, 0) > 0;
    }

    // The notification without blocking and without allocating (the inline path): false
    // when the peer's socket is full (nothing was sent; use send()), else the outcome.
    bool trySend(ByteView payload, Status* out) {
        uint8_t head[8 + 2];
        std::memcpy(head, &self_instance, 8);
        const uint16_t n = static_cast<uint16_t>(self_name.size());
        std::memcpy(head + 8, &n, 2);
        iovec iov[3] = {{head, sizeof(head)},
                        {const_cast<char*>(self_name.data()), self_name.size()},
                        {const_cast<uint8_t*>(payload.data()), payload.size()}};
        msghdr msg{};
        msg.msg_iov = iov;
        msg.msg_iovlen = 3;
        const size_t total = sizeof(head) + self_name.size() + payload.size();
        std::unique_lock<std::mutex> lock(send_mutex, std::try_to_lock);
        if (!lock.owns_lock()) return false;
        for (;;) {
            const ssize_t k = ::sendmsg(notify_socket.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (k == static_cast<ssize_t>(total)) {
                *out = Status::ok();
                return true;
            }
            if (k < 0 && errno == EINTR) continue;
            if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return false;
            if (k < 0 && (errno == EPIPE || errno == ECONNRESET || errno == ECONNREFUSED)) {
                *out = Status::peerUnreachable("shm peer '" + name + "' closed its notification socket");
                return true;
            }
            *out = Status::systemErrno("shm notification send to '" + name + "'", k < 0 ? errno : EIO);
            return true;
        }
    }

    Status send(ByteView payload) {
        Bytes msg;
        msg.resize(8 + 2 + self_name.size() + payload.size());
        std::memcpy(msg.data(), &self_instance, 8);
        const uint16_t n = static_cast<uint16_t>(self_name.size());
        std::memcpy(msg.data() + 8, &n, 2);
        std::memcpy(msg.data() + 10, self_name.data(), self_name.size());
        if (!payload.empty()) std::memcpy(msg.data() + 10 + self_name.size(), payload.data(), payload.size());
        std::lock_guard<std::mutex> lock(send_mutex);
        for (;;) {
            const ssize_t k = ::send(notify_socket.fd, msg.data(), msg.size(), MSG_NOSIGNAL);
            if (k == static_cast<ssize_t>(msg.size())) return Status::ok();
            if (k < 0 && errno == EINTR) continue;
            if (k < 0 && (errno == EPIPE || errno == ECONNRESET || errno == ECONNREFUSED)) {
                return Status::peerUnreachable("shm peer '" + name + "' closed its notification socket");
            }
            return Status::systemErrno("shm notification send to '" + name + "'", k < 0 ? errno : EIO);
        }
    }
};

// Remote key: u8 kind (0 = reach by CMA, 1 = memfd) [i32 fd in the owner, u64 offset].
constexpr uint8_t kKeyCma = 0;
constexpr uint8_t kKeyMemfd = 1;

struct ShmRegion : BackendRegion {
    std::optional<ShareableRange> shareable;
    Bytes remoteKey() const override {
        if (!shareable) return {kKeyCma};
        Bytes key(13);
        key[0] = kKeyMemfd;
        const int32_t fd = shareable->fd;
        std::memcpy(key.data() + 1, &fd, 4);
        std::memcpy(key.data() + 5, &shareable->offset, 8);
        return key;
    }
};

// The peer's region as this process reaches it: mapped (memfd) or by address (CMA).
struct ShmRemoteRegion : BackendRemoteRegion {
    uint8_t* mapped = nullptr;  // start of the region in our mapping, or null for CMA
    void* mapping = nullptr;
    size_t mapping_bytes = 0;
    ~ShmRemoteRegion() override {
        if (mapping != nullptr) ::munmap(mapping, mapping_bytes);
    }
};

Status cmaError(const ShmPeer& peer, int err) {
    if (err == ESRCH || peer.exited()) {
        return Status::peerUnreachable("shm peer '" + peer.name + "' (pid " + std::to_string(peer.pid) +
                                       ") exited");
    }
    if (err == EPERM) {
        return Status::system("cross-memory attach into pid " + std::to_string(peer.pid) +
                              " is not permitted: both processes must run as the same user, and "
                              "Yama ptrace_scope or a container seccomp profile may forbid "
                              "process_vm_writev (see docs/shm.md)");
    }
    if (err == EFAULT) {
        return Status::remote("shm peer '" + peer.name +
                              "' memory is not mapped at the target address "
                              "(was the region freed without deregistering?)");
    }
    return Status::systemErrno("process_vm_writev/readv into pid " + std::to_string(peer.pid), err);
}

// Moves runs [first, end) of one part (one remote region), by memcpy into the mapped
// memfd or by cross-memory attach.
Status copyPartRuns(TransferJob& job, uint64_t first, uint64_t end, bool liveness_checked) {
    auto& peer = static_cast<ShmPeer&>(*job.peer);
    const JobPart& part = job.parts[job.partOf(first)];
    if (uint8_t* mapped = static_cast<ShmRemoteRegion*>(part.remote.backend)->mapped) {
        // The mapping outlives the peer, so liveness is checked explicitly.
        if (!liveness_checked && peer.exited()) return cmaError(peer, ESRCH);
        for (uint64_t i = first; i < end; ++i) {
            const FlatRun r = job.run(i);
            if (job.op == Op::kWrite) {
                copyRun(mapped + r.remote_offset, r.local, r.length);
            } else {
                copyRun(r.local, mapped + r.remote_offset, r.length);
            }
        }
        copyFence();  // before the pool may send the notification
        return Status::ok();
    }
    iovec local[kMaxIov];
    iovec remote[kMaxIov];
    size_t n = 0;
    size_t total = 0;
    for (uint64_t i = first; i < end; ++i, ++n) {
        const FlatRun r = job.run(i);
        local[n] = {r.local, r.length};
        remote[n] = {reinterpret_cast<void*>(r.remote_address), r.length};
        total += r.length;
    }
    size_t index = 0;
    while (total > 0) {
        if (peer.exited()) return cmaError(peer, ESRCH);
        const ssize_t k =
            job.op == Op::kWrite
                ? ::process_vm_writev(peer.pid, local + index, n - index, remote + index, n - index, 0)
                : ::process_vm_readv(peer.pid, local + index, n - index, remote + index, n - index, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            return cmaError(peer, errno);
        }
        if (k == 0) return cmaError(peer, EFAULT);
        // Skip what was moved; a partially moved element is advanced on both sides.
        size_t moved = static_cast<size_t>(k);
        total -= moved;
        while (moved > 0) {
            const size_t step = std::min(moved, local[index].iov_len);
            local[index].iov_base = static_cast<uint8_t*>(local[index].iov_base) + step;
            local[index].iov_len -= step;
            remote[index].iov_base = static_cast<uint8_t*>(remote[index].iov_base) + step;
            remote[index].iov_len -= step;
            moved -= step;
            if (local[index].iov_len == 0) ++index;
        }
    }
    return Status::ok();
}

// A chunk may span parts (regions); each part's runs go by that region's mechanism.
// `liveness_checked`: the caller polled the peer's pidfd just before (the inline path).
Status copyChunk(TransferJob& job, uint64_t first, uint64_t end, bool liveness_checked = false) {
    while (first < end) {
        const uint32_t p = job.partOf(first);
        const uint64_t part_end = p + 1 < job.parts.size() ? job.parts[p + 1].first_run : job.num_runs;
        const uint64_t stop = std::min(end, part_end);
        KVXFER_RETURN_IF_ERROR(copyPartRuns(job, first, stop, liveness_checked));
        first = stop;
    }
    return Status::ok();
}

// State shared with the listener thread, so the thread never touches the backend.
struct Listener {
    NotificationSink* sink = nullptr;
    Fd listen_fd;
    Fd stop_fd;
    Fd epoll_fd;
    // Accepted connections, closed with the listener: a peer then sees its notification
    // sends refused instead of queueing into a socket nobody reads.
    std::vector<Fd> accepted;

    void dropAccepted(int fd) {
        std::erase_if(accepted, [fd](const Fd& a) { return a.fd == fd; });
    }

    void run() {
        std::vector<uint8_t> buf(kMaxMessage);
        epoll_event events[16];
        for (;;) {
            const int n = ::epoll_wait(epoll_fd.fd, events, 16, -1);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) return;
            for (int i = 0; i < n; ++i) {
                const int fd = events[i].data.fd;
                if (fd == stop_fd.fd) return;
                if (fd == listen_fd.fd) {
                    const int c = ::accept4(listen_fd.fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
                    if (c >= 0) {
                        accepted.emplace_back(c);
                        epoll_event ev{};
                        ev.events = EPOLLIN;
                        ev.data.fd = c;
                        ::epoll_ctl(epoll_fd.fd, EPOLL_CTL_ADD, c, &ev);
                    }
                    continue;
                }
                for (;;) {
                    const ssize_t k = ::recv(fd, buf.data(), buf.size(), 0);
                    if (k < 0 && errno == EINTR) continue;
                    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
                    if (k <= 0) {
                        ::epoll_ctl(epoll_fd.fd, EPOLL_CTL_DEL, fd, nullptr);
                        dropAccepted(fd);
                        break;
                    }
                    if (k < 10) continue;  // malformed: ignore
                    uint64_t instance = 0;
                    uint16_t name_len = 0;
                    std::memcpy(&instance, buf.data(), 8);
                    std::memcpy(&name_len, buf.data() + 8, 2);
                    if (10u + name_len > static_cast<size_t>(k)) continue;
                    std::string name(reinterpret_cast<char*>(buf.data() + 10), name_len);
                    sink->deliver(std::move(name), instance,
                                  Bytes(buf.begin() + 10 + name_len, buf.begin() + k));
                }
            }
        }
    }
};

class ShmBackend final : public Backend {
public:
    static Result<std::unique_ptr<Backend>> create(const BackendContext& ctx) {
        // Let peers of the same user attach even under Yama ptrace_scope=1.
        ::prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
        auto listener = std::make_shared<Listener>();
        listener->sink = ctx.sink;
        listener->listen_fd = Fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
        if (listener->listen_fd.fd < 0) return Status::systemErrno("shm: socket(AF_UNIX)", errno);
        const std::string name = socketName(ctx.instance_id);
        socklen_t len = 0;
        sockaddr_un addr = abstractAddress(name, &len);
        if (::bind(listener->listen_fd.fd, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
            return Status::systemErrno("shm: bind notification socket @" + name, errno);
        }
        if (::listen(listener->listen_fd.fd, 128) != 0) return Status::systemErrno("shm: listen", errno);
        listener->stop_fd = Fd(::eventfd(0, EFD_CLOEXEC));
        listener->epoll_fd = Fd(::epoll_create1(EPOLL_CLOEXEC));
        if (listener->stop_fd.fd < 0 || listener->epoll_fd.fd < 0) {
            return Status::systemErrno("shm: eventfd/epoll", errno);
        }
        for (int fd : {listener->listen_fd.fd, listener->stop_fd.fd}) {
            epoll_event ev{};
            ev.events = EPOLLIN;
            ev.data.fd = fd;
            ::epoll_ctl(listener->epoll_fd.fd, EPOLL_CTL_ADD, fd, &ev);
        }
        return std::unique_ptr<Backend>(new ShmBackend(ctx, std::move(listener), name));
    }

    ~ShmBackend() override {
        const uint64_t one = 1;
        (void)::write(listener_->stop_fd.fd, &one, sizeof(one));
        if (thread_.get_id() == std::this_thread::get_id()) {
            thread_.detach();
        } else {
            thread_.join();
        }
    }

    std::string_view name() const override { return "shm"; }
    const BackendCaps& caps() const override { return caps_; }
    std::string describe() const override {
        return "shm (memcpy into the peer's mapped memfd for kvxfer.empty memory, cross-memory attach "
               "otherwise; " +
               std::to_string(pool_.threads()) + " threads)";
    }

    Bytes endpointInfo() const override {
        Bytes out(12 + socket_name_.size());
        const uint32_t pid = static_cast<uint32_t>(::getpid());
        std::memcpy(out.data(), &pid, 4);
        std::memcpy(out.data() + 4, &start_time_, 8);
        std::memcpy(out.data() + 12, socket_name_.data(), socket_name_.size());
        return out;
    }

    Result<std::unique_ptr<BackendRegion>> registerMemory(const MemorySpan& span) override {
        auto region = std::make_unique<ShmRegion>();
        region->shareable = findShareableRange(span.base, span.length);  // else CMA: nothing to pin
        return std::unique_ptr<BackendRegion>(std::move(region));
    }

    Result<std::shared_ptr<BackendPeer>> connect(const PeerIdentity& identity, ByteView info,
                                                 Clock::time_point) override {
        if (!identity.same_host) return Status::unsupported("shm reaches engines on this host only");
        if (info.size() < 13 || info.size() > 12 + 64) {
            return Status::badDescriptor("shm endpoint info of peer '" + identity.name + "' is malformed");
        }
        uint32_t pid = 0;
        uint64_t start = 0;
        std::memcpy(&pid, info.data(), 4);
        std::memcpy(&start, info.data() + 4, 8);
        if (pid != identity.pid || pid == 0) {
            return Status::badDescriptor("shm endpoint pid does not match peer '" + identity.name + "'");
        }
        auto peer = std::make_shared<ShmPeer>();
        peer->name = identity.name;
        peer->pid = static_cast<pid_t>(pid);
        peer->self_name = self_name_;
        peer->self_instance = self_instance_;
        peer->pidfd = Fd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
        if (peer->pidfd.fd < 0) {
            if (errno == ESRCH)
                return Status::peerUnreachable("shm peer '" + identity.name + "' is not running");
            return Status::systemErrno("pidfd_open(" + std::to_string(pid) + ")", errno);
        }
        if (processStartTime(peer->pid) != start) {
            return Status::peerUnreachable("shm peer '" + identity.name + "' pid " + std::to_string(pid) +
                                           " now belongs to another process");
        }
        const std::string sock(reinterpret_cast<const char*>(info.data() + 12), info.size() - 12);
        peer->notify_socket = Fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
        socklen_t len = 0;
        sockaddr_un addr = abstractAddress(sock, &len);
        if (::connect(peer->notify_socket.fd, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
            return Status::peerUnreachable("shm peer '" + identity.name +
                                           "' notification socket: " + std::strerror(errno));
        }
        return std::shared_ptr<BackendPeer>(std::move(peer));
    }

    Result<std::unique_ptr<BackendRemoteRegion>> importRemoteRegion(BackendPeer& backend_peer,
                                                                    const RegionDescriptor& region,
                                                                    ByteView key) override {
        auto& peer = static_cast<ShmPeer&>(backend_peer);
        auto remote = std::make_unique<ShmRemoteRegion>();
        if (key.empty() || key[0] > kKeyMemfd || (key[0] == kKeyMemfd && key.size() != 13)) {
            return Status::badDescriptor("shm key of region " + std::to_string(region.id) + " of peer '" +
                                         peer.name + "' is malformed");
        }
        if (key[0] == kKeyCma) return std::unique_ptr<BackendRemoteRegion>(std::move(remote));
        int32_t remote_fd = 0;
        uint64_t offset = 0;
        std::memcpy(&remote_fd, key.data() + 1, 4);
        std::memcpy(&offset, key.data() + 5, 8);
        // Take a copy of the peer's memfd (same permission check as CMA) and map it.
        // Failure is not fatal: the region is then reached by CMA.
        Fd fd(static_cast<int>(::syscall(SYS_pidfd_getfd, peer.pidfd.fd, remote_fd, 0)));
        if (fd.fd < 0) return std::unique_ptr<BackendRemoteRegion>(std::move(remote));
        const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
        const uint64_t head = offset % page;
        const size_t bytes = static_cast<size_t>(head + region.length);
        // Not populated: setting up page tables for the whole region would make add_peer
        // grow with the peer's memory (0.45 s for 5 GiB); pages are mapped as copies touch
        // them (the memfd's pages exist already, so each fault is a minor one).
        void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.fd,
                         static_cast<off_t>(offset - head));
        if (p == MAP_FAILED) return std::unique_ptr<BackendRemoteRegion>(std::move(remote));
        remote->mapping = p;
        remote->mapping_bytes = bytes;
        remote->mapped = static_cast<uint8_t*>(p) + head;
        return std::unique_ptr<BackendRemoteRegion>(std::move(remote));
    }

    Status submit(const std::shared_ptr<TransferJob>& job) override {
        auto& peer = static_cast<ShmPeer&>(*job->peer);
        if (peer.exited()) return cmaError(peer, ESRCH);
        pool_.submit(job);
        return Status::ok();
    }

    Result<bool> trySubmitInline(const std::shared_ptr<TransferJob>& job) override {
        if (job->num_runs > kInlineMaxRuns) return false;
        auto& peer = static_cast<ShmPeer&>(*job->peer);
        if (peer.exited()) return cmaError(peer, ESRCH);  // nothing started: the core may reconnect
        // No abandonment check first: a job just posted has not been seen by anyone;
        // the job machine checks its deadline and cancellation after the copy.
        const Status st = copyChunk(*job, 0, job->num_runs, /*liveness_checked=*/true);
        if (job->dataDone(st, true) == TransferJob::AfterData::kSendNotification) {
            Status sent;
            if (peer.trySend(job->notify, &sent)) {
                job->finish(std::move(sent));
            } else {
                pool_.commitLater(job);  // the socket is full or busy: a worker sends it
            }
        }
        return true;
    }

    Status notify(BackendPeer& peer, ByteView payload, Clock::time_point) override {
        return static_cast<ShmPeer&>(peer).send(payload);
    }

private:
    ShmBackend(const BackendContext& ctx, std::shared_ptr<Listener> listener, std::string socket_name)
        : listener_(std::move(listener)),
          socket_name_(std::move(socket_name)),
          self_name_(ctx.engine_name),
          self_instance_(ctx.instance_id),
          start_time_(processStartTime(::getpid())),
          pool_(
              ctx.config->shm.threads ? ctx.config->shm.threads
                                      : std::min(4u, std::max(1u, std::thread::hardware_concurrency())),
              kMaxIov, 64 << 20,
              [](TransferJob& job, uint64_t first, uint64_t end) { return copyChunk(job, first, end); },
              [](TransferJob& job) { return static_cast<ShmPeer&>(*job.peer).send(job.notify); }) {
        caps_.lanes = pool_.threads();  // copy threads share a job
        caps_.inline_max_bytes = ctx.config->shm.inline_max_bytes;
        thread_ = std::thread([l = listener_] { l->run(); });
    }

    // Runs up to 64 MiB keep memcpy on its non-temporal path yet split 1 GiB over threads.
    BackendCaps caps_{.same_process_only = false, .same_host_only = true, .max_run_bytes = 64 << 20};
    std::shared_ptr<Listener> listener_;
    std::string socket_name_;
    std::string self_name_;
    uint64_t self_instance_;
    uint64_t start_time_;
    CopyPool pool_;
    std::thread thread_;
};

}  // namespace

Status shmAvailability() {
    char src = 1, dst = 0;
    iovec l{&dst, 1}, r{&src, 1};
    if (::process_vm_readv(::getpid(), &l, 1, &r, 1, 0) != 1) {
        return Status::systemErrno("process_vm_readv on this process failed", errno);
    }
    return Status::ok();
}

Result<std::unique_ptr<Backend>> createShmBackend(const BackendContext& context) {
    return ShmBackend::create(context);
}

}  // namespace kvxfer
