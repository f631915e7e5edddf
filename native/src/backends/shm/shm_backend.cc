// Shared-memory backend for engines on one host: one copy, straight between the two
// processes' registered buffers, by one of two mechanisms chosen per remote region:
// - the peer's region lies in a kvxfer HostBuffer (memfd): the initiator takes a copy
//   of the peer's memfd with pidfd_getfd, maps it, and copies in user space
//   (util/fast_copy.h: streaming stores for runs of 4 KiB and more). The fast path.
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
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <optional>
#include <thread>
#include <unordered_map>

#include "backends/factories.h"
#include "backends/shm/exports.h"
#include "kvxfer/config.h"
#include "kvxfer/host_memory.h"
#include "util/auth.h"
#include "util/copy_pool.h"
#include "util/fast_copy.h"
#include "util/notify_socket.h"
#include "util/proc_file.h"
#include "util/scoped_fd.h"

namespace kvxfer {
namespace {

constexpr size_t kMaxIov = 1024;  // UIO_MAXIOV
// The inline path (the posting thread copies; ShmConfig::inline_max_bytes, 64 KiB by
// default: below it a copy costs less than handing the job to a copy thread and waking the
// caller; docs/benchmarks.md, Latency) takes jobs of at most this many runs.
constexpr uint64_t kInlineMaxRuns = 64;

uint64_t processStartTime(pid_t pid) {
    const auto line = procfs::readFile(("/proc/" + std::to_string(pid) + "/stat").c_str());
    if (!line) return 0;
    const auto close = line->rfind(')');
    if (close == std::string::npos) return 0;
    // Fields after the command name start at 3 (state); starttime is field 22.
    const auto v = procfs::toNumber(procfs::field(std::string_view(*line).substr(close + 1), 22 - 3));
    return v && *v > 0 ? static_cast<uint64_t>(*v) : 0;
}

std::string socketName(uint64_t instance) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "kvxfer-shm-%016llx", static_cast<unsigned long long>(instance));
    return buf;
}

// The notification socket and its handshake: util/notify_socket.h (shared with cuda_ipc).
// The target's WELCOME passes its export table's memfd.
const notify_socket::Protocol kProtocol{"shm", 0x3153564b};  // "KVS1"

struct ShmPeer : BackendPeer, std::enable_shared_from_this<ShmPeer> {
    std::string name;
    pid_t pid = 0;
    Fd pidfd;
    std::shared_ptr<notify_socket::Sender> sender;  // the authenticated notification socket
    std::string self_name;
    uint64_t self_instance = 0;
    std::shared_ptr<shm::TableMapping> exports;  // the peer's export table (its WELCOME)

    bool exited() const {
        pollfd p{pidfd.fd, POLLIN, 0};
        return ::poll(&p, 1, 0) > 0;
    }
};

// Remote key: u8 version (2), u32 slot, u64 tag: a reference into the target's export
// table (exports.h), never an fd or an address the initiator would trust.
constexpr uint8_t kKeyVersion = 2;
constexpr size_t kKeyBytes = 13;

struct ShmRegion : BackendRegion {
    std::shared_ptr<shm::ExportTable> exports;
    uint32_t slot = 0;
    uint64_t tag = 0;
    ~ShmRegion() override {
        exports->revoke(slot);
        exports->release(slot);
    }
    Bytes remoteKey() const override {
        Bytes key(kKeyBytes);
        key[0] = kKeyVersion;
        std::memcpy(key.data() + 1, &slot, 4);
        std::memcpy(key.data() + 5, &tag, 8);
        return key;
    }
};

// The peer's region as this process reaches it: mapped (memfd) or by address (CMA), and
// always through its export slot, checked around every chunk.
struct ShmRemoteRegion : BackendRemoteRegion {
    std::shared_ptr<shm::TableMapping> exports;  // keeps `slot` mapped
    shm::Slot* slot = nullptr;
    uint64_t tag = 0;
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
    auto& import = *static_cast<ShmRemoteRegion*>(part.remote.backend);
    shm::SlotUse use(*import.slot, import.tag);
    if (!use.ok()) {
        return Status::remote("shm peer '" + peer.name +
                              "' no longer exports the region (deregistered or closed)");
    }
    if (uint8_t* mapped = import.mapped) {
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

class ShmBackend final : public Backend {
public:
    static Result<std::unique_ptr<Backend>> create(const BackendContext& ctx) {
        // Let peers of the same user attach even under Yama ptrace_scope=1.
        ::prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
        KVXFER_ASSIGN_OR_RETURN(std::shared_ptr<shm::ExportTable> exports, shm::ExportTable::create());
        const std::string name = socketName(ctx.instance_id);
        KVXFER_ASSIGN_OR_RETURN(
            auto listener, notify_socket::Listener::start(*ctx.threads, kProtocol, name, ctx.secret, ctx.sink,
                                                          exports->fd(), exports));
        return std::unique_ptr<Backend>(new ShmBackend(ctx, std::move(exports), std::move(listener), name));
    }

    ~ShmBackend() override { shutdown(); }

    // Copy workers end what is queued; queued notifications end (kCanceled); the listener
    // closes its connections. The threads return on their own; the engine joins them.
    void shutdown() override {
        pool_.stop();
        notifier_->stop();
        listener_->stop();
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
        const uint64_t base = reinterpret_cast<uint64_t>(span.base);
        uint32_t kind = shm::kSlotCma;  // any memory: cross-memory attach
        int32_t fd = -1;
        uint64_t ino = 0, offset = 0;
        if (auto range = findShareableRange(span.base, span.length)) {  // a kvxfer.empty buffer: mapped
            struct stat st {};
            if (::fstat(range->fd, &st) == 0) {
                kind = shm::kSlotMemfd;
                fd = range->fd;
                ino = st.st_ino;
                offset = range->offset;
            }
        }
        auto& exports = exports_;
        KVXFER_ASSIGN_OR_RETURN(auto slot, exports->publish(kind, base, span.length, fd, ino, offset));
        auto region = std::make_unique<ShmRegion>();
        region->exports = exports;
        region->slot = slot.first;
        region->tag = slot.second;
        return std::unique_ptr<BackendRegion>(std::move(region));
    }

    void revokeMemory(BackendRegion& region) override {
        auto& r = static_cast<ShmRegion&>(region);
        r.exports->revoke(r.slot);
    }

    // The initiator's side of the socket handshake (util/notify_socket.h): proves the peer's
    // secret, checks the peer's proof, and receives its export table.
    Status handshake(ShmPeer& peer, const PeerIdentity& identity, const std::string& sock,
                     Clock::time_point deadline) const {
        Fd table;
        KVXFER_ASSIGN_OR_RETURN(Fd fd, notify_socket::connect(kProtocol, sock, identity, self_instance_,
                                                              self_name_, deadline, &table));
        peer.sender =
            std::make_shared<notify_socket::Sender>(kProtocol, identity.name, std::move(fd), notifier_);
        struct stat tst {};
        if (::fstat(table.fd, &tst) != 0 || static_cast<uint64_t>(tst.st_size) < shm::kTableBytes) {
            return Status::peerUnreachable("shm peer '" + identity.name + "' sent a malformed export table");
        }
        peer.exports = std::make_shared<shm::TableMapping>();
        return peer.exports->map(table.fd);
    }

    Result<std::shared_ptr<BackendPeer>> connect(const PeerIdentity& identity, ByteView info,
                                                 Clock::time_point deadline) override {
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
        KVXFER_RETURN_IF_ERROR(handshake(*peer, identity, sock, deadline));
        return std::shared_ptr<BackendPeer>(std::move(peer));
    }

    Result<std::unique_ptr<BackendRemoteRegion>> importRemoteRegion(BackendPeer& backend_peer,
                                                                    const RegionDescriptor& region,
                                                                    ByteView key) override {
        auto& peer = static_cast<ShmPeer&>(backend_peer);
        const std::string what = "shm region " + std::to_string(region.id) + " of peer '" + peer.name + "'";
        if (key.size() != kKeyBytes || key[0] != kKeyVersion)
            return Status::badDescriptor(what + ": malformed key");
        uint32_t index = 0;
        uint64_t tag = 0;
        std::memcpy(&index, key.data() + 1, 4);
        std::memcpy(&tag, key.data() + 5, 8);
        if (index >= shm::kSlots || tag == 0) return Status::badDescriptor(what + ": malformed key");
        shm::Slot& slot = peer.exports->slots[index];
        // The descriptor must describe exactly what the peer exports now.
        shm::SlotUse use(slot, tag);
        const uint32_t kind = slot.kind;
        const uint64_t base = slot.base, length = slot.length, ino = slot.ino, offset = slot.offset;
        const int32_t remote_fd = slot.fd;
        if (!use.ok() || base != region.base_address || length != region.length) {
            return Status::badDescriptor(
                what + " does not match what the peer exports (stale or forged descriptor)");
        }
        auto remote = std::make_unique<ShmRemoteRegion>();
        remote->exports = peer.exports;
        remote->slot = &slot;
        remote->tag = tag;
        if (kind != shm::kSlotMemfd) return std::unique_ptr<BackendRemoteRegion>(std::move(remote));
        // Take a copy of the peer's memfd (same permission check as CMA), check it is the
        // exported one and large enough, and map it. Failure is not fatal: CMA then.
        Fd fd(static_cast<int>(::syscall(SYS_pidfd_getfd, peer.pidfd.fd, remote_fd, 0)));
        struct stat st {};
        if (fd.fd < 0 || ::fstat(fd.fd, &st) != 0 || static_cast<uint64_t>(st.st_ino) != ino ||
            offset > static_cast<uint64_t>(st.st_size) ||
            length > static_cast<uint64_t>(st.st_size) - offset) {
            return std::unique_ptr<BackendRemoteRegion>(std::move(remote));
        }
        const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
        const uint64_t head = offset % page;
        const size_t bytes = static_cast<size_t>(head + length);
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
        return pool_.submit(job);
    }

    Result<bool> trySubmitInline(const std::shared_ptr<TransferJob>& job) override {
        if (job->num_runs > kInlineMaxRuns) return false;
        auto& peer = static_cast<ShmPeer&>(*job->peer);
        if (peer.exited()) return cmaError(peer, ESRCH);  // nothing started: the core may reconnect
        // No abandonment check first: a job just posted has not been seen by anyone;
        // the job machine checks its deadline and cancellation after the copy.
        const Status st = copyChunk(*job, 0, job->num_runs, /*liveness_checked=*/true);
        if (job->dataDone(st, true) == TransferJob::AfterData::kSendNotification) {
            // Sent at once, or queued to the notifier (which finishes the job).
            if (auto sent = peer.sender->sendForJob(job)) job->finish(std::move(*sent));
        }
        return true;
    }

    Status notify(BackendPeer& backend_peer, ByteView payload, Clock::time_point deadline) override {
        auto& peer = static_cast<ShmPeer&>(backend_peer);
        return peer.sender->send(payload, deadline);
    }

private:
    ShmBackend(const BackendContext& ctx, std::shared_ptr<shm::ExportTable> exports,
               std::shared_ptr<notify_socket::Listener> listener, std::string socket_name)
        : exports_(std::move(exports)),
          listener_(std::move(listener)),
          socket_name_(std::move(socket_name)),
          self_name_(ctx.engine_name),
          self_instance_(ctx.instance_id),
          start_time_(processStartTime(::getpid())),
          notifier_(notify_socket::Notifier::start(*ctx.threads)),
          pool_(
              *ctx.threads,
              ctx.config->shm.threads ? ctx.config->shm.threads
                                      : std::min(4u, std::max(1u, std::thread::hardware_concurrency())),
              kMaxIov, 64 << 20,
              [](TransferJob& job, uint64_t first, uint64_t end) { return copyChunk(job, first, end); },
              [](const std::shared_ptr<TransferJob>& job) {
                  auto& peer = static_cast<ShmPeer&>(*job->peer);
                  return peer.sender->sendForJob(job);
              }) {
        caps_.lanes = pool_.threads();  // copy threads share a job
        caps_.inline_max_bytes = ctx.config->shm.inline_max_bytes;
    }

    // Runs up to 64 MiB keep memcpy on its non-temporal path yet split 1 GiB over threads.
    BackendCaps caps_{.same_process_only = false, .same_host_only = true, .max_run_bytes = 64 << 20};
    std::shared_ptr<shm::ExportTable> exports_;
    std::shared_ptr<notify_socket::Listener> listener_;
    std::string socket_name_;
    std::string self_name_;
    uint64_t self_instance_;
    uint64_t start_time_;
    std::shared_ptr<notify_socket::Notifier> notifier_;  // started with the engine: never null
    CopyPool pool_;
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
