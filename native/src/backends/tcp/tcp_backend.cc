// TCP backend: engines on any hosts reach each other over one TCP connection per
// (initiator engine -> peer engine). Wire format: tcp_wire.h.
//
// Bind address: TcpConfig::listen (EngineConfig.backend.tcp.listen, or the environment
// overlay KVXFER_TCP_LISTEN): "HOST:PORT", ":PORT", "HOST:" or "HOST" with HOST an IPv4
// literal, "localhost" or "*". A malformed value fails engine creation. Empty: 127.0.0.1:0,
// loopback only and an ephemeral port (docs/security.md: an engine is reachable from a
// network only when its configuration names an address).
// The descriptor publishes the port and, for a wildcard bind, every IPv4 address of this
// host (getifaddrs; non-loopback first, loopback last); for a specific bind, that address.
// connect() tries them in order, giving each a share of the time left.
//
// Data path (initiator = the engine that posts; target = the engine whose memory is named):
// - Per peer connection the initiator runs a sender thread (the only writer of the
//   socket besides the inline path; submit() and notify() queue to it and never touch the
//   network) and a receiver thread (ACKs and READ data). The target parks idle connections
//   in one epoll set; the listener thread serves small WRITE / END / NOTIFY frames of a
//   readable connection itself, from one buffered read (server.cc, the quick path), and
//   hands the rest (handshake, large frames, READ_REQ) to a worker pool that grows only
//   with connections busy at the same time: 1000 connected idle peers cost no threads.
// - Small writes (TcpConfig::inline_max_bytes, 64 KiB): the posting thread sends WRITE +
//   END in one sendmsg when the sender is idle (sendInline), and the thread that waits for
//   the job reads the ACK itself while no other thread reads the socket (receiver.cc,
//   TransferJob::Progress); the receiver thread then sleeps on an eventfd and the socket's
//   hang-up, not on its data, and reads an inline job's ACK only if nobody waited for it
//   within kCallerGrace (or the job is watched). One request: two threads run, the poster
//   and the target's listener, as in a plain socket ping-pong. Both poll for a bounded,
//   adaptive while before they sleep (TcpConfig::spin_us, spin.h).
// - WRITE: the sender streams WRITE frames (<= 512 runs, <= 8 MiB) with sendmsg straight
//   from registered memory, then END. The target checks every run against its own table
//   of registered ranges and recvs the payload straight into place; a run outside every
//   registered range is drained into a scratch buffer and fails the job with kRemote. At
//   END the target delivers the notification, then ACKs; the job is DONE on the ACK.
// - READ: the sender issues READ_REQ frames (at most 64 MiB outstanding per connection, so
//   a cancel stops the stream soon); the target validates and answers each with one
//   READ_DATA frame that the receiver recvs straight into local memory. Then the
//   notification, if any, goes to the target in an END and the job ends on its ACK.
// - Abandoned jobs (deadline, cancel, engine close) stop at the next frame boundary, so
//   the stream stays parseable. A peer that stops reading mid-frame of an abandoned job,
//   a committed job not acknowledged by its deadline (+1 s), a reset, EOF or malformed
//   frame kills the connection (with a RST, so unsent bytes are dropped): every job on it
//   fails with kPeerUnreachable. The next job or notification reconnects (the peer must
//   still be the same engine instance), and the target fences off the older connections
//   of that initiator before it answers (InboundFence), so no stale byte lands later.
// - Every socket call sleeps at most one 50 ms slice (SO_SNDTIMEO / SO_RCVTIMEO) and then
//   checks for shutdown, deadlines and stalls, so nothing blocks for long; destruction
//   shuts sockets down, which wakes every call at once.
//
// Thread lifetimes: threads capture only shared state (Shared, PeerConn), never the
// backend or the BackendPeer. The listener, each connection's sender and each session's
// receiver are threads of the engine's ThreadGroup, joined by Engine::close(); the inbound
// workers are the listener's children, joined by it before it returns. shutdown() stops
// the listener and every connection; a TcpPeer that goes stops its own connection.
//
// This file is the Backend subclass (listen socket, region registration, connect, submit,
// notify); README.md maps the other files.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <list>
#include <thread>

#include "backends/factories.h"
#include "backends/tcp/tcp_internal.h"
#include "kvxfer/config.h"

namespace kvxfer {
namespace {

using namespace tcp;

struct TcpRegion final : BackendRegion {
    std::shared_ptr<Shared> shared;
    std::shared_ptr<RegionEntry> entry;
    ~TcpRegion() override { shared->regions.remove(entry); }
    // Remote key: the registration's u64 tag (little-endian), named by every frame.
    Bytes remoteKey() const override {
        Bytes key(8);
        putLe(key.data(), entry->tag, 8);
        return key;
    }
};

class TcpBackend final : public Backend {
public:
    static Result<std::unique_ptr<Backend>> create(const BackendContext& ctx) {
        BindSpec bind;
        bind.host = htonl(INADDR_LOOPBACK);  // only a configured address opens the engine to a network
        if (const std::string& listen = ctx.config->tcp.listen; !listen.empty()) {
            auto parsed = parseBind(listen, true);
            if (!parsed) {
                return Status::invalidArgument("tcp listen address '" + listen +
                                               "' is not HOST:PORT, :PORT or HOST (IPv4 HOST, port 0-65535)");
            }
            bind = *parsed;
        }
        if (ctx.config->tcp.spin_us > AdaptiveSpin::kMaxUs) {
            return Status::invalidArgument("tcp spin_us " + std::to_string(ctx.config->tcp.spin_us) +
                                           " is above the limit of 1000000 (1 s)");
        }
        auto sh = std::make_shared<Shared>();
        sh->threads = ctx.threads;
        sh->sink = ctx.sink;
        sh->name = ctx.engine_name;
        sh->instance = ctx.instance_id;
        sh->secret = ctx.secret;
        sh->spin_us = ctx.config->tcp.spin_us;
        sh->listen_fd = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
        if (sh->listen_fd.fd < 0) return Status::systemErrno("tcp: socket", errno);
        const int one = 1;
        ::setsockopt(sh->listen_fd.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        setBuffers(sh->listen_fd.fd);  // inherited by accepted sockets, before the handshake
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_port = htons(bind.port);
        addr.sin_addr.s_addr = bind.host;
        const std::string where = ipString(bind.host) + ":" + std::to_string(bind.port);
        if (::bind(sh->listen_fd.fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
            return Status::systemErrno("tcp: bind " + where, errno);
        }
        if (::listen(sh->listen_fd.fd, 128) != 0) return Status::systemErrno("tcp: listen " + where, errno);
        socklen_t len = sizeof(addr);
        if (::getsockname(sh->listen_fd.fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
            return Status::systemErrno("tcp: getsockname", errno);
        }
        sh->wake_fd = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
        if (sh->wake_fd.fd < 0) return Status::systemErrno("tcp: eventfd", errno);
        sh->epoll_fd = Fd(::epoll_create1(EPOLL_CLOEXEC));
        if (sh->epoll_fd.fd < 0) return Status::systemErrno("tcp: epoll_create1", errno);
        return std::unique_ptr<Backend>(new TcpBackend(ctx, std::move(sh), bind.host, ntohs(addr.sin_port)));
    }

    ~TcpBackend() override { shutdown(); }

    // The listener stops serving (it joins its workers and closes every inbound connection);
    // every connection this backend made stops (queued jobs end, sessions break).
    void shutdown() override {
        shared_->stopping.store(true);
        const uint64_t one = 1;
        (void)!::write(shared_->wake_fd.fd, &one, sizeof(one));
        std::vector<std::weak_ptr<PeerConn>> conns;
        {
            std::lock_guard<std::mutex> lock(shared_->peer_conns_mutex);
            conns.swap(shared_->peer_conns);
        }
        for (auto& w : conns) {
            if (auto c = w.lock()) stopConnection(*c);
        }
    }

    std::string_view name() const override { return "tcp"; }
    const BackendCaps& caps() const override { return caps_; }
    std::string describe() const override {
        return "tcp (listening on " + ipString(bind_host_) + ":" + std::to_string(port_) + ")";
    }

    Bytes endpointInfo() const override {
        if (bind_host_ != htonl(INADDR_ANY)) return encodeEndpoint(port_, {bind_host_});
        return encodeEndpoint(port_, localAddresses());
    }

    Result<std::unique_ptr<BackendRegion>> registerMemory(const MemorySpan& span) override {
        uint8_t* base = span.base;
        const uint64_t length = span.length;
        auto r = std::make_unique<TcpRegion>();
        r->shared = shared_;
        uint64_t tag = 0;
        while (tag == 0)
            KVXFER_RETURN_IF_ERROR(auth::randomBytes(reinterpret_cast<uint8_t*>(&tag), sizeof(tag)));
        r->entry = shared_->regions.add(tag, reinterpret_cast<uint64_t>(base), length);
        return std::unique_ptr<BackendRegion>(std::move(r));
    }

    void revokeMemory(BackendRegion& region) override {
        auto& r = static_cast<TcpRegion&>(region);
        r.shared->regions.remove(r.entry);
    }

    Result<std::shared_ptr<BackendPeer>> connect(const PeerIdentity& identity, ByteView info,
                                                 Clock::time_point deadline) override {
        auto c = std::make_shared<PeerConn>();
        if (!decodeEndpoint(info, &c->port, &c->addrs)) {
            return Status::badDescriptor("tcp endpoint info of peer '" + identity.name + "' is malformed");
        }
        c->peer_name = identity.name;
        c->peer_instance = identity.instance_id;
        c->self_name = self_name_;
        c->self_instance = self_instance_;
        c->peer_secret = identity.secret;
        c->threads = shared_->threads;
        c->caller_spin.setBudget(shared_->spin_us);
        while (c->link == 0) {
            KVXFER_RETURN_IF_ERROR(auth::randomBytes(reinterpret_cast<uint8_t*>(&c->link), sizeof(c->link)));
        }
        {
            // Registered before anything starts, so shutdown() stops all of it; refused
            // after shutdown.
            std::lock_guard<std::mutex> lock(shared_->peer_conns_mutex);
            if (shared_->stopping.load()) return Status::canceled("tcp backend is closing");
            std::erase_if(shared_->peer_conns, [](const auto& w) { return w.expired(); });
            shared_->peer_conns.push_back(c);
        }
        // From here on the TcpPeer stops the connection when it goes (also on an error).
        auto peer = std::make_shared<TcpPeer>();
        peer->conn = c;
        KVXFER_ASSIGN_OR_RETURN(Fd fd, dial(*c, deadline));
        KVXFER_RETURN_IF_ERROR(startSession(c, std::move(fd)));
        if (!shared_->threads->spawn([c] { senderLoop(c); }))
            return Status::canceled("tcp backend is closing");
        return std::shared_ptr<BackendPeer>(std::move(peer));
    }

    Result<std::unique_ptr<BackendRemoteRegion>> importRemoteRegion(BackendPeer& peer,
                                                                    const RegionDescriptor& region,
                                                                    ByteView key) override {
        if (key.size() != 8) {
            return Status::badDescriptor("tcp key of region " + std::to_string(region.id) + " of " +
                                         static_cast<TcpPeer&>(peer).conn->label() + " is malformed");
        }
        auto remote = std::make_unique<TcpRemoteRegion>();
        remote->tag = getLe(key.data(), 8);
        return std::unique_ptr<BackendRemoteRegion>(std::move(remote));
    }

    Status submit(const std::shared_ptr<TransferJob>& job) override {
        for (const JobPart& part : job->parts) {
            for (const Run& r : part.plan->runs) {
                if (r.length > kMaxRunBytes) {
                    return Status::internal("tcp: plan has a run of " + std::to_string(r.length) +
                                            " bytes, above max_run_bytes");
                }
            }
        }
        PeerConn& c = *static_cast<TcpPeer&>(*job->peer).conn;
        {
            std::lock_guard<std::mutex> lock(c.mutex);
            // Stopped: the sender may have returned, and nobody would end the job.
            if (c.stopping.load()) return Status::canceled(c.label() + ": connection closed");
            c.queue.push_back({SendItem::kJob, job, nullptr, nullptr});
        }
        c.cv.notify_all();
        return Status::ok();
    }

    Result<bool> trySubmitInline(const std::shared_ptr<TransferJob>& job) override {
        return sendInline(static_cast<TcpPeer&>(*job->peer).conn, job);
    }

    Status notify(BackendPeer& peer, ByteView payload, Clock::time_point deadline) override {
        if (payload.size() > kMaxNotifyBytes)
            return Status::invalidArgument("notification payload is larger than 64 KiB");
        PeerConn& c = *static_cast<TcpPeer&>(peer).conn;
        auto w = std::make_shared<NotifyWaiter>();
        w->payload.assign(payload.begin(), payload.end());
        w->deadline = deadline;
        {
            std::lock_guard<std::mutex> lock(c.mutex);
            if (c.stopping.load()) return Status::canceled(c.label() + ": connection closed");
            c.queue.push_back({SendItem::kNotifyItem, nullptr, nullptr, w});
        }
        c.cv.notify_all();
        std::unique_lock<std::mutex> lock(w->mutex);
        if (!w->cv.wait_until(lock, deadline, [&] { return w->done; })) {
            return Status::timeout(c.label() + ": notification not acknowledged before its deadline");
        }
        return w->status;
    }

private:
    TcpBackend(const BackendContext& ctx, std::shared_ptr<Shared> sh, uint32_t bind_host, uint16_t port)
        : shared_(std::move(sh)),
          bind_host_(bind_host),
          port_(port),
          self_name_(ctx.engine_name),
          self_instance_(ctx.instance_id) {
        caps_.inline_max_bytes = ctx.config->tcp.inline_max_bytes;
        ctx.threads->spawn([s = shared_] { listenLoop(s); });  // at engine creation: the group is open
    }

    BackendCaps caps_{.same_process_only = false, .same_host_only = false, .max_run_bytes = kMaxRunBytes};
    std::shared_ptr<Shared> shared_;
    uint32_t bind_host_;
    uint16_t port_;
    std::string self_name_;
    uint64_t self_instance_;
};

}  // namespace

Result<std::unique_ptr<Backend>> createTcpBackend(const BackendContext& context) {
    return TcpBackend::create(context);
}

}  // namespace kvxfer
