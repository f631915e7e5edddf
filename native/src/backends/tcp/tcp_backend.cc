// TCP backend: engines on any hosts reach each other over one TCP connection per
// (initiator engine -> peer engine). Wire format: tcp_wire.h.
//
// Bind address: TcpConfig::listen (EngineConfig.backend.tcp.listen, or the environment
// overlay KVXFER_TCP_LISTEN): "HOST:PORT", ":PORT", "HOST:" or "HOST" with HOST an IPv4
// literal, "localhost" or "*". A malformed value fails engine creation. Empty: 0.0.0.0:0,
// every interface and an ephemeral port.
// The descriptor publishes the port and, for a wildcard bind, every IPv4 address of this
// host (getifaddrs; non-loopback first, loopback last); for a specific bind, that address.
// connect() tries them in order, giving each a share of the time left.
//
// Data path (initiator = the engine that posts; target = the engine whose memory is named):
// - Per peer connection the initiator runs a sender thread (the only writer of the
//   socket; submit() and notify() queue to it and never touch the network) and a receiver
//   thread (ACKs and READ data). The target serves each accepted connection on one thread.
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
// backend or the BackendPeer. The backend joins its listener and inbound threads (they
// hold no job, so it is never destroyed on one of them). A connection's sender and
// receivers are detached, not joined, when its TcpPeer goes: see ~TcpPeer.
#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <list>
#include <map>
#include <optional>
#include <thread>
#include <unordered_map>

#include "backends/factories.h"
#include "backends/tcp/tcp_wire.h"
#include "kvxfer/config.h"

namespace kvxfer {
namespace {

using namespace tcp;
using namespace std::chrono_literals;

constexpr uint64_t kReadWindowBytes = 64ull << 20;  // outstanding READ bytes per connection
constexpr auto kStallGrace = 1000ms;                // see "kills the connection" above
constexpr auto kHandshakeTimeout = 10s;             // target side: HELLO must arrive by then
constexpr auto kScanInterval = 100ms;
constexpr int kSocketBufferBytes = 8 << 20;
constexpr size_t kScratchBytes = 256 * 1024;

std::string ipString(uint32_t addr_be) {
    char buf[INET_ADDRSTRLEN] = {0};
    in_addr a{};
    a.s_addr = addr_be;
    ::inet_ntop(AF_INET, &a, buf, sizeof(buf));
    return buf;
}

std::string errnoText(int err) {
    return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")";
}

// The n-th (0-based) number of a /proc/sys file; 0 when unreadable.
long readSysctl(const char* path, int index = 0) {
    std::ifstream f(path);
    long v = 0;
    for (int i = 0; i <= index; ++i) {
        if (!(f >> v)) return 0;
    }
    return v;
}

// Large buffers keep a fast or long link busy. Linux autotunes a socket's buffers up to
// net.ipv4.tcp_{w,r}mem[2] unless SO_{SND,RCV}BUF is set, so a direction is only pinned
// (to kSocketBufferBytes) when its autotuning ceiling is lower than that: SO_*BUFFORCE
// where allowed (CAP_NET_ADMIN), else SO_*BUF if net.core.*mem_max permits the full size
// (a capped SO_*BUF would only shrink the buffer).
void setBuffers(int fd) {
    static const long tune_w = readSysctl("/proc/sys/net/ipv4/tcp_wmem", 2);
    static const long tune_r = readSysctl("/proc/sys/net/ipv4/tcp_rmem", 2);
    static const long core_w = readSysctl("/proc/sys/net/core/wmem_max");
    static const long core_r = readSysctl("/proc/sys/net/core/rmem_max");
    const int n = kSocketBufferBytes;
    if (tune_w < n && ::setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &n, sizeof(n)) != 0 && core_w >= n) {
        ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &n, sizeof(n));
    }
    if (tune_r < n && ::setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &n, sizeof(n)) != 0 && core_r >= n) {
        ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &n, sizeof(n));
    }
}

void tuneConnection(int fd) {
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    const int idle = 15, interval = 5, count = 4;
    ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
    ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval));
    ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof(count));
    // Data unacknowledged this long (peer host gone, no RST) breaks the connection.
    const unsigned user_timeout_ms = 30000;
    ::setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof(user_timeout_ms));
}

// True once `now` is more than `grace` past `deadline` (overflow-safe for time_point::max()).
bool pastDeadline(Clock::time_point deadline, Clock::time_point now, Clock::duration grace = {}) {
    return now > deadline && now - deadline > grace;
}

Status statusFromWire(uint32_t code, const std::string& message) {
    if (code == 0 || code > static_cast<uint32_t>(StatusCode::kInternal)) {
        return Status::remote(message.empty() ? "tcp peer reported an unknown failure" : message);
    }
    return {static_cast<StatusCode>(code), message};
}

// ---------------------------------------------------------------------------------------
// Bind address and endpoint info

struct BindSpec {
    uint32_t host = htonl(INADDR_ANY);  // network order
    uint16_t port = 0;
};

// Parses "HOST:PORT", ":PORT", "HOST:" (and "HOST" when allow_bare_host).
std::optional<BindSpec> parseBind(const std::string& spec, bool allow_bare_host) {
    const auto colon = spec.rfind(':');
    if (colon == std::string::npos && !allow_bare_host) return std::nullopt;
    const std::string host = colon == std::string::npos ? spec : spec.substr(0, colon);
    const std::string port = colon == std::string::npos ? "" : spec.substr(colon + 1);
    BindSpec out;
    if (host.empty() || host == "*" || host == "0.0.0.0") {
        out.host = htonl(INADDR_ANY);
    } else if (host == "localhost") {
        out.host = htonl(INADDR_LOOPBACK);
    } else {
        in_addr a{};
        if (::inet_pton(AF_INET, host.c_str(), &a) != 1) return std::nullopt;
        out.host = a.s_addr;
    }
    if (!port.empty()) {
        if (port.size() > 5 ||
            !std::all_of(port.begin(), port.end(), [](char ch) { return ch >= '0' && ch <= '9'; })) {
            return std::nullopt;
        }
        const unsigned long p = std::stoul(port);
        if (p > 65535) return std::nullopt;
        out.port = static_cast<uint16_t>(p);
    }
    return out;
}

// This host's IPv4 addresses (network order): non-loopback first, then loopback.
std::vector<uint32_t> localAddresses() {
    std::vector<uint32_t> outer, loop;
    ifaddrs* list = nullptr;
    if (::getifaddrs(&list) == 0) {
        for (ifaddrs* i = list; i; i = i->ifa_next) {
            if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET || !(i->ifa_flags & IFF_UP)) continue;
            const uint32_t a = reinterpret_cast<const sockaddr_in*>(i->ifa_addr)->sin_addr.s_addr;
            auto& v = (i->ifa_flags & IFF_LOOPBACK) ? loop : outer;
            if (std::find(v.begin(), v.end(), a) == v.end()) v.push_back(a);
        }
        ::freeifaddrs(list);
    }
    if (loop.empty()) loop.push_back(htonl(INADDR_LOOPBACK));
    outer.insert(outer.end(), loop.begin(), loop.end());
    if (outer.size() > 32) outer.erase(outer.begin() + 31, outer.end() - 1);  // keep loopback
    return outer;
}

// Endpoint info: u8 version (1), u8 address count n (1..32), u16 port (LE), n x IPv4 (network order).
Bytes encodeEndpoint(uint16_t port, const std::vector<uint32_t>& addrs) {
    Bytes out(4 + 4 * addrs.size());
    out[0] = 1;
    out[1] = static_cast<uint8_t>(addrs.size());
    putLe(out.data() + 2, port, 2);
    for (size_t i = 0; i < addrs.size(); ++i) std::memcpy(out.data() + 4 + 4 * i, &addrs[i], 4);
    return out;
}

bool decodeEndpoint(ByteView info, uint16_t* port, std::vector<uint32_t>* addrs) {
    if (info.size() < 8 || info[0] != 1) return false;
    const size_t n = info[1];
    if (n == 0 || n > 32 || info.size() != 4 + 4 * n) return false;
    *port = static_cast<uint16_t>(getLe(info.data() + 2, 2));
    if (*port == 0) return false;
    addrs->resize(n);
    for (size_t i = 0; i < n; ++i) std::memcpy(&(*addrs)[i], info.data() + 4 + 4 * i, 4);
    return true;
}

// ---------------------------------------------------------------------------------------
// Target side: registered ranges, and serving one inbound connection

struct RegionEntry {
    uint64_t base = 0;
    uint64_t length = 0;
    std::atomic<bool> alive{true};
    uint32_t pins = 0;  // guarded by RegionTable::mutex_
};

// Every range registered with this backend. A receiver pins the entries a frame touches
// while it moves bytes; unregistering waits for the pins (a pinning thread notices
// `alive` turning false within one poll slice and lets go).
class RegionTable {
public:
    std::shared_ptr<RegionEntry> add(uint64_t base, uint64_t length) {
        auto e = std::make_shared<RegionEntry>();
        e->base = base;
        e->length = length;
        std::lock_guard<std::mutex> lock(mutex_);
        entries_.push_back(e);
        return e;
    }
    void remove(const std::shared_ptr<RegionEntry>& e) {
        std::unique_lock<std::mutex> lock(mutex_);
        e->alive.store(false, std::memory_order_release);
        cv_.wait(lock, [&] { return e->pins == 0; });
        std::erase(entries_, e);
    }
    // The live entry containing [addr, addr + len), pinned; null when there is none.
    std::shared_ptr<RegionEntry> pin(uint64_t addr, uint64_t len) {
        std::lock_guard<std::mutex> lock(mutex_);
        for (const auto& e : entries_) {
            if (contains(*e, addr, len) && e->alive.load(std::memory_order_acquire)) {
                ++e->pins;
                return e;
            }
        }
        return nullptr;
    }
    void unpin(RegionEntry& e) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--e.pins == 0) cv_.notify_all();
    }
    static bool contains(const RegionEntry& e, uint64_t addr, uint64_t len) {
        return addr >= e.base && len <= e.length && addr - e.base <= e.length - len;
    }

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    std::vector<std::shared_ptr<RegionEntry>> entries_;
};

// The entries pinned for one frame.
class Pins {
public:
    explicit Pins(RegionTable& table) : table_(table) {}
    ~Pins() { release(); }
    bool pin(uint64_t addr, uint64_t len) {
        for (const auto& e : held_) {
            if (RegionTable::contains(*e, addr, len)) return true;
        }
        auto e = table_.pin(addr, len);
        if (!e) return false;
        held_.push_back(std::move(e));
        return true;
    }
    bool alive() const {
        for (const auto& e : held_) {
            if (!e->alive.load(std::memory_order_acquire)) return false;
        }
        return true;
    }
    void release() {
        for (const auto& e : held_) table_.unpin(*e);
        held_.clear();
    }

private:
    RegionTable& table_;
    std::vector<std::shared_ptr<RegionEntry>> held_;
};

// Orders an inbound connection against the later ones of the same initiator instance.
// When a dead connection is replaced (reconnect), bytes of abandoned jobs may still sit
// in the old socket's receive queue; they must never land after the new connection has
// delivered newer data. A new HELLO therefore marks every older connection of that
// initiator superseded and waits until none is inside a memory section; a superseded
// connection moves no more bytes and closes.
struct InboundFence {
    std::mutex section;  // held while bytes move to or from registered memory
    std::atomic<bool> superseded{false};
};

// State shared by the backend, its listener and its inbound connection threads.
struct Shared {
    NotificationSink* sink = nullptr;
    std::string name;
    uint64_t instance = 0;
    RegionTable regions;
    std::atomic<bool> stopping{false};
    Fd listen_fd;
    Fd wake_fd;

    struct Inbound {
        Fd fd;
        std::thread thread;
        std::shared_ptr<std::atomic<bool>> done;
    };
    std::mutex mutex;
    std::list<Inbound> inbound;

    std::mutex fence_mutex;
    std::multimap<uint64_t, std::weak_ptr<InboundFence>> fences;  // by initiator instance

    // Registers a new connection of `initiator`, fencing off its older ones.
    std::shared_ptr<InboundFence> newFence(uint64_t initiator) {
        auto fence = std::make_shared<InboundFence>();
        std::vector<std::shared_ptr<InboundFence>> older;
        {
            std::lock_guard<std::mutex> lock(fence_mutex);
            for (auto it = fences.begin(); it != fences.end();) {
                auto f = it->second.lock();
                if (!f) {
                    it = fences.erase(it);
                    continue;
                }
                if (it->first == initiator) older.push_back(std::move(f));
                ++it;
            }
            fences.emplace(initiator, fence);
        }
        for (auto& f : older) {
            f->superseded.store(true);
            // A section in progress ends within one poll slice once it sees `superseded`.
            std::lock_guard<std::mutex> wait_out(f->section);
        }
        return fence;
    }
};

class InboundConnection {
public:
    InboundConnection(Shared& shared, int fd) : sh_(shared), fd_(fd), scratch_(kScratchBytes) {}

    void serve() {
        if (!handshake().isOk()) return;
        uint8_t hb[kHeaderBytes];
        for (;;) {
            if (!recvBytes(fd_, hb, sizeof(hb), stopCheck(), "tcp target").isOk()) return;
            Header h;
            if (!decodeHeader(hb, &h)) return;      // malformed: close
            if (fence_->superseded.load()) return;  // the initiator reconnected: stale stream
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
            if (!ok) return;
        }
    }

private:
    struct StopCheck {
        const Shared* sh;
        const InboundFence* fence;
        Status operator()(bool) const {
            if (sh->stopping.load()) return Status::canceled("tcp backend is closing");
            if (fence && fence->superseded.load())
                return Status::canceled("tcp: superseded by a newer connection");
            return Status::ok();
        }
    };
    StopCheck stopCheck() const { return {&sh_, fence_.get()}; }

    Status reply(const Header& h, const std::string& body = {}) {
        out_.clear();
        appendFrame(out_, h, body.data(), body.size());
        return sendBytes(fd_, out_.data(), out_.size(), stopCheck(), "tcp target reply");
    }

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
        peer_name_.resize(h.aux);
        KVXFER_RETURN_IF_ERROR(recvBytes(fd_, peer_name_.data(), peer_name_.size(), check, "tcp hello"));
        peer_instance_ = h.job;
        Header ack{.type = kHelloAck, .job = sh_.instance};
        if (h.a != sh_.instance) {
            const std::string msg = "engine '" + sh_.name + "' listening here is another instance (" +
                                    std::to_string(sh_.instance) + ", not " + std::to_string(h.a) +
                                    "): the peer restarted";
            ack.aux = static_cast<uint32_t>(StatusCode::kPeerUnreachable);
            ack.b = msg.size();
            (void)reply(ack, msg);
            return Status::peerUnreachable(msg);
        }
        fence_ = sh_.newFence(peer_instance_);
        return reply(ack);
    }

    // Reads and checks a run table of `n` runs totalling `bytes`. False: malformed.
    bool readTable(const Header& h) {
        const uint32_t n = h.aux;
        if (n == 0 || n > kMaxBatchRuns || h.b > kMaxBatchBytes) return false;
        table_.resize(static_cast<size_t>(n) * 16);
        if (!recvBytes(fd_, table_.data(), table_.size(), stopCheck(), "tcp target").isOk()) return false;
        uint64_t sum = 0;
        for (uint32_t i = 0; i < n; ++i) {
            const uint64_t len = getLe(table_.data() + 16 * i + 8, 8);
            if (len == 0 || len > kMaxRunBytes) return false;
            sum += len;
        }
        return sum == h.b;
    }
    uint64_t runAddr(uint32_t i) const { return getLe(table_.data() + 16 * i, 8); }
    uint64_t runLen(uint32_t i) const { return getLe(table_.data() + 16 * i + 8, 8); }

    bool discard(uint64_t n) {
        while (n > 0) {
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
            if (!pins.pin(runAddr(i), runLen(i))) {
                pins.release();
                char buf[160];
                std::snprintf(
                    buf, sizeof(buf), "range [0x%llx, +%llu) is outside every region registered with '",
                    static_cast<unsigned long long>(runAddr(i)), static_cast<unsigned long long>(runLen(i)));
                failJob(h.job, Status::remote("tcp peer: write to " + std::string(buf) + sh_.name + "'"));
                return discard(h.b);
            }
        }
        std::unique_lock<std::mutex> section(fence_->section);
        if (fence_->superseded.load()) return false;
        IovCursor cur;
        for (uint32_t i = 0; i < h.aux; ++i) cur.add(reinterpret_cast<void*>(runAddr(i)), runLen(i));
        bool region_gone = false;
        auto check = [&](bool) {
            if (sh_.stopping.load()) return Status::canceled("tcp backend is closing");
            if (fence_->superseded.load()) return Status::canceled("tcp: superseded by a newer connection");
            if (!pins.alive()) {
                region_gone = true;
                return Status::remote("tcp peer: a destination region of '" + sh_.name +
                                      "' was deregistered during the transfer");
            }
            return Status::ok();
        };
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
        if (!recvBytes(fd_, payload.data(), payload.size(), stopCheck(), "tcp target").isOk()) return false;
        Status st;
        if (auto it = failed_.find(h.job); it != failed_.end()) {
            st = std::move(it->second);
            failed_.erase(it);
        }
        if (h.aux & kEndAbort) return true;
        if (st.isOk() && (h.aux & kEndNotify))
            sh_.sink->deliver(peer_name_, peer_instance_, std::move(payload));
        const std::string& msg = st.message();
        return reply({.type = kAck, .aux = static_cast<uint32_t>(st.code()), .job = h.job, .b = msg.size()},
                     msg)
            .isOk();
    }

    bool onReadReq(const Header& h) {
        if (!readTable(h)) return false;
        Pins pins(sh_.regions);
        for (uint32_t i = 0; i < h.aux; ++i) {
            if (!pins.pin(runAddr(i), runLen(i))) {
                char buf[160];
                std::snprintf(buf, sizeof(buf),
                              "tcp peer: read of [0x%llx, +%llu) is outside every region registered with '",
                              static_cast<unsigned long long>(runAddr(i)),
                              static_cast<unsigned long long>(runLen(i)));
                const std::string msg = buf + sh_.name + "'";
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
        auto check = [&](bool) {
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
        if (!recvBytes(fd_, payload.data(), payload.size(), stopCheck(), "tcp target").isOk()) return false;
        sh_.sink->deliver(peer_name_, peer_instance_, std::move(payload));
        return reply({.type = kNotifyAck, .job = h.job}).isOk();
    }

    Shared& sh_;
    int fd_;
    std::string peer_name_;
    uint64_t peer_instance_ = 0;
    std::vector<uint8_t> table_;
    std::vector<uint8_t> scratch_;
    std::vector<uint8_t> out_;
    std::unordered_map<uint64_t, Status> failed_;  // WRITE jobs that hit an error, until their END
    std::shared_ptr<InboundFence> fence_;
};

void reapInbound(Shared& sh) {
    std::list<Shared::Inbound> finished;
    {
        std::lock_guard<std::mutex> lock(sh.mutex);
        for (auto it = sh.inbound.begin(); it != sh.inbound.end();) {
            if (it->done->load()) {
                finished.splice(finished.end(), sh.inbound, it++);
            } else {
                ++it;
            }
        }
    }
    for (auto& in : finished) in.thread.join();
}

void listenLoop(const std::shared_ptr<Shared>& sh) {
    for (;;) {
        pollfd fds[2] = {{sh->listen_fd.fd, POLLIN, 0}, {sh->wake_fd.fd, POLLIN, 0}};
        const int r = ::poll(fds, 2, 1000);
        if (sh->stopping.load()) return;
        reapInbound(*sh);
        if (r <= 0 || !(fds[0].revents & POLLIN)) continue;
        const int c = ::accept4(sh->listen_fd.fd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                std::this_thread::sleep_for(10ms);  // do not spin on a pending connection
            }
            continue;
        }
        tuneConnection(c);
        setSliceTimeouts(c);
        auto done = std::make_shared<std::atomic<bool>>(false);
        std::lock_guard<std::mutex> lock(sh->mutex);
        sh->inbound.push_back({Fd(c), {}, done});
        sh->inbound.back().thread = std::thread([sh, c, done] {
            InboundConnection(*sh, c).serve();
            ::shutdown(c, SHUT_RDWR);
            done->store(true);
        });
    }
}

// ---------------------------------------------------------------------------------------
// Initiator side

struct NotifyWaiter {
    Bytes payload;
    Clock::time_point deadline;
    std::mutex mutex;
    std::condition_variable cv;
    bool done = false;
    Status status;

    void complete(Status st) {
        {
            std::lock_guard<std::mutex> lock(mutex);
            if (done) return;
            done = true;
            status = std::move(st);
        }
        cv.notify_all();
    }
};

// A job on a connection. Ownership of finishing it: the sender while `streaming` (it is
// reading local memory or issuing READ requests); afterwards the receiver (ACK, READ data,
// abandonment scan, connection loss). If the receiver is already gone (rx_done) when the
// sender lets go, the sender finishes it.
struct Pending {
    std::shared_ptr<TransferJob> job;
    bool streaming = true;
    bool awaiting_ack = false;
    bool committed = false;          // commitNow() succeeded: ends only on ACK or connection loss
    bool stopped_early = false;      // READ: abandoned before every request was sent
    uint32_t reads_outstanding = 0;  // READ_REQ frames not answered yet
    Status error;                    // READ: first failure
};

struct ReadBatch {
    uint64_t job;
    uint64_t first, end, bytes;
};

struct Session {
    Fd fd;
    std::atomic<bool> dead{false};
    // Guarded by PeerConn::mutex.
    bool rx_done = false;
    Status death;
    std::map<uint64_t, Pending> pending;
    std::deque<ReadBatch> batches;
    uint64_t window = 0;
    std::map<uint64_t, std::shared_ptr<NotifyWaiter>> waiters;
};

struct SendItem {
    enum Kind : uint8_t { kJob, kCommit, kNotifyItem } kind = kJob;
    std::shared_ptr<TransferJob> job;
    std::shared_ptr<Session> session;  // kCommit
    std::shared_ptr<NotifyWaiter> waiter;
};

struct PeerConn {
    // Immutable after connect().
    std::string peer_name;
    uint64_t peer_instance = 0;
    uint16_t port = 0;
    std::vector<uint32_t> addrs;
    std::string self_name;
    uint64_t self_instance = 0;

    std::atomic<bool> stopping{false};
    std::mutex mutex;
    std::condition_variable cv;  // queue, read window, stop
    std::deque<SendItem> queue;
    std::deque<SendItem> commits;  // READ notifications whose data arrived: sent first
    std::shared_ptr<Session> session;
    uint64_t next_notify_seq = 1;

    std::thread sender;
    std::vector<std::thread> receivers;  // guarded by mutex; one per live session

    std::string label() const { return "tcp peer '" + peer_name + "'"; }
    ~PeerConn() {  // normally detached by ~TcpPeer already; the last owner may be one of them
        if (sender.joinable()) sender.detach();
        for (auto& r : receivers) {
            if (r.joinable()) r.detach();
        }
    }
};

struct TcpPeer final : BackendPeer {
    std::shared_ptr<PeerConn> conn;
    ~TcpPeer() override;
};

void finishAll(std::vector<std::pair<std::shared_ptr<TransferJob>, Status>>& list) {
    for (auto& [job, st] : list) job->finish(std::move(st));
    list.clear();  // drops the references outside any lock
}

// Aborts a connection with a RST: what is still queued in our send buffer is dropped
// instead of reaching the peer after we gave up on it (connect(AF_UNSPEC) disconnects a
// TCP socket without closing the descriptor other threads may be using).
void resetConnection(int fd) {
    sockaddr sa{};
    sa.sa_family = AF_UNSPEC;
    ::connect(fd, &sa, sizeof(sa));
    ::shutdown(fd, SHUT_RDWR);
}

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
                      Status error = {}) {
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
            if (stopped_early) {
                finish.emplace_back(p.job, Status::canceled("tcp: write abandoned"));
                s->pending.erase(it);
            }
        } else if (p.reads_outstanding == 0) {
            completeRead(c, s, it, finish);
        }
    }
    finishAll(finish);
}

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
            if (!p.streaming && p.committed && pastDeadline(job.deadline, now, kStallGrace)) {
                kill = Status::peerUnreachable(c.label() + " did not acknowledge transfer " +
                                               std::to_string(job.id) + " by its deadline");
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

// Opens and handshakes a connection to the peer, trying its addresses in order, until
// `deadline` or until `give_up()` (the job or notification it is for was abandoned).
Result<Fd> dial(const PeerConn& c, Clock::time_point deadline, const std::function<bool()>& give_up = {}) {
    std::string failures;
    const size_t n = c.addrs.size();
    for (size_t i = 0; i < n; ++i) {
        if (c.stopping.load()) return Status::canceled(c.label() + ": connection closed");
        if (give_up && give_up())
            return Status::canceled("tcp: gave up connecting to peer '" + c.peer_name + "'");
        const auto now = Clock::now();
        if (now >= deadline) break;
        const auto slice = now + (deadline - now) / static_cast<int64_t>(n - i);
        const std::string where = ipString(c.addrs[i]) + ":" + std::to_string(c.port);
        auto check = [&](Clock::time_point until) {
            return [&c, &give_up, until](bool) {
                if (c.stopping.load()) return Status::canceled(c.label() + ": connection closed");
                if (give_up && give_up()) return Status::canceled("tcp: gave up connecting");
                if (Clock::now() >= until) return Status::timeout("timed out");
                return Status::ok();
            };
        };
        Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
        if (fd.fd < 0) return Status::systemErrno("tcp: socket", errno);
        setBuffers(fd.fd);  // before connect: the window scale is negotiated in the SYN
        tuneConnection(fd.fd);
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_port = htons(c.port);
        addr.sin_addr.s_addr = c.addrs[i];
        Status st;
        if (::connect(fd.fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
            if (errno != EINPROGRESS) {
                st = Status::peerUnreachable(errnoText(errno));
            } else {
                auto until_check = check(slice);
                for (;;) {
                    pollfd p{fd.fd, POLLOUT, 0};
                    const int r = ::poll(&p, 1, kPollSliceMs);
                    if (r > 0) {
                        int err = 0;
                        socklen_t len = sizeof(err);
                        ::getsockopt(fd.fd, SOL_SOCKET, SO_ERROR, &err, &len);
                        if (err != 0) st = Status::peerUnreachable(errnoText(err));
                        break;
                    }
                    if (r < 0 && errno != EINTR) {
                        st = Status::peerUnreachable(errnoText(errno));
                        break;
                    }
                    st = until_check(true);
                    if (!st.isOk()) break;
                }
            }
        }
        if (st.isOk()) {
            const int flags = ::fcntl(fd.fd, F_GETFL);
            ::fcntl(fd.fd, F_SETFL, flags & ~O_NONBLOCK);
            setSliceTimeouts(fd.fd);
            // HELLO: who we are, and which instance we expect to find.
            std::vector<uint8_t> hello;
            appendFrame(hello,
                        {.type = kHello,
                         .aux = static_cast<uint32_t>(c.self_name.size()),
                         .job = c.self_instance,
                         .a = c.peer_instance},
                        c.self_name.data(), c.self_name.size());
            auto hs_check = check(deadline);
            st = sendBytes(fd.fd, hello.data(), hello.size(), hs_check, "hello");
            uint8_t hb[kHeaderBytes];
            if (st.isOk()) st = recvBytes(fd.fd, hb, sizeof(hb), hs_check, "hello");
            Header h;
            if (st.isOk() && (!decodeHeader(hb, &h) || h.type != kHelloAck || h.b > kMaxMessageBytes)) {
                st = Status::peerUnreachable("not a kvxfer tcp endpoint (bad HELLO reply)");
            }
            std::string msg;
            if (st.isOk() && h.b) {
                msg.resize(h.b);
                st = recvBytes(fd.fd, msg.data(), msg.size(), hs_check, "hello");
            }
            if (st.isOk() && h.aux != 0) st = statusFromWire(h.aux, msg);
            if (st.isOk() && h.job != c.peer_instance)
                st = Status::peerUnreachable("another engine instance answered");
            if (st.isOk()) return fd;
            if (st.code() == StatusCode::kCanceled) return st;
        } else if (st.code() == StatusCode::kCanceled) {
            return st;
        }
        failures += (failures.empty() ? "" : "; ") + where + ": " + st.message();
    }
    if (failures.empty()) failures = "no time left to connect";
    return Status::peerUnreachable("tcp: cannot reach peer '" + c.peer_name + "' (" + failures + ")");
}

// A live session with `reg` applied under the lock, reconnecting once if needed.
template <typename Register>
Result<std::shared_ptr<Session>> acquire(const std::shared_ptr<PeerConn>& c, Clock::time_point deadline,
                                         const std::function<bool()>& give_up, Register&& reg) {
    for (int attempt = 0;; ++attempt) {
        {
            std::lock_guard<std::mutex> lock(c->mutex);
            if (c->stopping.load()) return Status::canceled(c->label() + ": connection closed");
            if (c->session && !c->session->dead.load()) {
                reg(*c->session);
                return c->session;
            }
        }
        if (attempt == 2) return Status::peerUnreachable(c->label() + ": connection lost while reconnecting");
        KVXFER_ASSIGN_OR_RETURN(Fd fd, dial(*c, deadline, give_up));
        startSession(c, std::move(fd));
    }
}

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

// Runs [first, end) of a job's flattened runs that fit one frame.
uint64_t batchEnd(const TransferJob& job, uint64_t first, uint64_t* bytes) {
    const uint64_t n = job.num_runs;
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
        encodeHeader({.type = kWrite, .aux = static_cast<uint32_t>(end - i), .job = job->id, .b = bytes},
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
        encodeHeader({.type = kReadReq, .aux = static_cast<uint32_t>(end - i), .job = job->id, .b = bytes},
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

void senderLoop(const std::shared_ptr<PeerConn>& c) {
    for (;;) {
        SendItem item;
        {
            std::unique_lock<std::mutex> lock(c->mutex);
            c->cv.wait(lock, [&] { return c->stopping.load() || !c->commits.empty() || !c->queue.empty(); });
            if (c->stopping.load()) return;  // nothing queued can hold a job: jobs keep the peer alive
            auto& q = c->commits.empty() ? c->queue : c->commits;
            item = std::move(q.front());
            q.pop_front();
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
        // Dropping the last job reference may destroy the TcpPeer (and the engine) on this
        // thread: it then detaches us, and the loop ends on `stopping`.
        item = {};
    }
}

// The connection's threads are told to stop and detached, never joined. The destructor
// may run under the Python GIL (the user dropped the last Peer) while one of these
// threads is still releasing its last reference to a finished job, whose Region may in
// turn release a Python buffer and wait for the GIL: a join would deadlock. The threads
// hold the PeerConn (never the backend) and exit within one poll slice.
TcpPeer::~TcpPeer() {
    std::vector<std::thread> receivers;
    {
        std::lock_guard<std::mutex> lock(conn->mutex);
        conn->stopping.store(true);
        if (conn->session) ::shutdown(conn->session->fd.fd, SHUT_RDWR);
        receivers.swap(conn->receivers);
    }
    conn->cv.notify_all();
    if (conn->sender.joinable()) conn->sender.detach();
    for (auto& r : receivers) r.detach();
}

// ---------------------------------------------------------------------------------------

struct TcpRegion final : BackendRegion {
    std::shared_ptr<Shared> shared;
    std::shared_ptr<RegionEntry> entry;
    ~TcpRegion() override { shared->regions.remove(entry); }
};

class TcpBackend final : public Backend {
public:
    static Result<std::unique_ptr<Backend>> create(const BackendContext& ctx) {
        BindSpec bind;
        if (const std::string& listen = ctx.config->tcp.listen; !listen.empty()) {
            auto parsed = parseBind(listen, true);
            if (!parsed) {
                return Status::invalidArgument("tcp listen address '" + listen +
                                               "' is not HOST:PORT, :PORT or HOST (IPv4 HOST, port 0-65535)");
            }
            bind = *parsed;
        }
        auto sh = std::make_shared<Shared>();
        sh->sink = ctx.sink;
        sh->name = ctx.engine_name;
        sh->instance = ctx.instance_id;
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
        return std::unique_ptr<Backend>(new TcpBackend(ctx, std::move(sh), bind.host, ntohs(addr.sin_port)));
    }

    ~TcpBackend() override {
        shared_->stopping.store(true);
        const uint64_t one = 1;
        (void)::write(shared_->wake_fd.fd, &one, sizeof(one));
        const auto self = std::this_thread::get_id();
        if (listener_.get_id() == self) {
            listener_.detach();
        } else {
            listener_.join();
        }
        std::list<Shared::Inbound> inbound;
        {
            std::lock_guard<std::mutex> lock(shared_->mutex);
            inbound.swap(shared_->inbound);
        }
        for (auto& in : inbound) ::shutdown(in.fd.fd, SHUT_RDWR);
        // Inbound threads hold no job, so the backend is never destroyed on one of them.
        for (auto& in : inbound) in.thread.join();
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
        r->entry = shared_->regions.add(reinterpret_cast<uint64_t>(base), length);
        return std::unique_ptr<BackendRegion>(std::move(r));
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
        KVXFER_ASSIGN_OR_RETURN(Fd fd, dial(*c, deadline));
        startSession(c, std::move(fd));
        c->sender = std::thread([c] { senderLoop(c); });
        auto peer = std::make_shared<TcpPeer>();
        peer->conn = std::move(c);
        return std::shared_ptr<BackendPeer>(std::move(peer));
    }

    Result<std::unique_ptr<BackendRemoteRegion>> importRemoteRegion(BackendPeer&, const RegionDescriptor&,
                                                                    ByteView) override {
        return std::make_unique<BackendRemoteRegion>();
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
            c.queue.push_back({SendItem::kJob, job, nullptr, nullptr});
        }
        c.cv.notify_all();
        return Status::ok();
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
        listener_ = std::thread([s = shared_] { listenLoop(s); });
    }

    BackendCaps caps_{.same_process_only = false, .same_host_only = false, .max_run_bytes = kMaxRunBytes};
    std::shared_ptr<Shared> shared_;
    uint32_t bind_host_;
    uint16_t port_;
    std::string self_name_;
    uint64_t self_instance_;
    std::thread listener_;
};

}  // namespace

Result<std::unique_ptr<Backend>> createTcpBackend(const BackendContext& context) {
    return TcpBackend::create(context);
}

}  // namespace kvxfer
