// TCP backend: types and functions shared by the files of native/src/backends/tcp.
// Private to this directory. The design summary is at the top of tcp_backend.cc; which
// file does what is in README.md.
//
// Target side (server.cc): Shared (listener, inbound threads, region table, fences).
// Initiator side, per peer connection (PeerConn): a Session per live socket, its Pending
// jobs and NotifyWaiters; dialer.cc opens sessions, sender.cc is the only writer of a
// socket, receiver.cc reads ACKs and READ data, session.cc holds the hand-offs between them.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backends/tcp/region_table.h"
#include "backends/tcp/spin.h"
#include "backends/tcp/tcp_wire.h"
#include "kvxfer/backend.h"
#include "util/auth.h"
#include "util/thread_group.h"

namespace kvxfer::tcp {

using namespace std::chrono_literals;

constexpr uint64_t kReadWindowBytes = 64ull << 20;  // outstanding READ bytes per connection
constexpr auto kStallGrace = 1000ms;                // see "kills the connection" in tcp_backend.cc
constexpr auto kHandshakeTimeout = 10s;             // target side: HELLO must arrive by then
constexpr size_t kMaxInbound = 4096;                // target side: connections served at once
constexpr size_t kMaxWorkers = 64;                  // target side: frames served at once
constexpr auto kFrameStall = 5s;                    // target side: no progress inside a frame: drop
constexpr auto kScanInterval = 100ms;
constexpr int kSocketBufferBytes = 8 << 20;
constexpr size_t kScratchBytes = 256 * 1024;
// Target side, the quick path (server.cc): small frames are served from one buffer on the
// listener thread.
constexpr size_t kQuickBufferBytes = 256 * 1024;
constexpr int kQuickRounds = 16;  // reads per readiness before the connection parks again
// The first read of a readiness takes at most this much: a default inline request (64 KiB
// + its headers) fits, and a large frame, which a worker serves, leaves at most this much
// read ahead for it to copy out of the quick path's buffer (was the whole 256 KiB).
constexpr size_t kQuickFirstReadBytes = 68 * 1024;

// ---- small helpers (socket_util.cc) -----------------------------------------------------

std::string ipString(uint32_t addr_be);
std::string errnoText(int err);
// Large socket buffers where autotuning would stay below kSocketBufferBytes.
void setBuffers(int fd);
// TCP_NODELAY, keepalive and TCP_USER_TIMEOUT of a connected socket.
void tuneConnection(int fd);
// True once `now` is more than `grace` past `deadline` (overflow-safe for time_point::max()).
bool pastDeadline(Clock::time_point deadline, Clock::time_point now, Clock::duration grace = {});
// The Status a peer reported as (code, message) on the wire.
Status statusFromWire(uint32_t code, const std::string& message);

// ---- bind address and endpoint info (endpoint.cc) --------------------------------------

struct BindSpec {
    uint32_t host = htonl(INADDR_ANY);  // network order
    uint16_t port = 0;
};

// Parses "HOST:PORT", ":PORT", "HOST:" (and "HOST" when allow_bare_host).
std::optional<BindSpec> parseBind(const std::string& spec, bool allow_bare_host);
// This host's IPv4 addresses (network order): non-loopback first, then loopback.
std::vector<uint32_t> localAddresses();
// Endpoint info: u8 version (1), u8 address count n (1..32), u16 port (LE), n x IPv4 (network order).
Bytes encodeEndpoint(uint16_t port, const std::vector<uint32_t>& addrs);
bool decodeEndpoint(ByteView info, uint16_t* port, std::vector<uint32_t>* addrs);

// ---- target side (server.cc) -------------------------------------------------------------

// Orders an inbound connection against the later ones of the same initiator instance.
// When a dead connection is replaced (reconnect), bytes of abandoned jobs may still sit
// in the old socket's receive queue; they must never land after the new connection has
// delivered newer data. A new HELLO therefore marks every older connection of that
// initiator superseded and waits until none is inside a memory section; a superseded
// connection moves no more bytes and closes.
// Keyed by (initiator instance, link id): only the initiator's own connection object can
// supersede its connections (an authenticated client naming another initiator's instance
// cannot cut that initiator's connection).
struct InboundFence {
    std::mutex section;  // held while bytes move to or from registered memory
    std::atomic<bool> superseded{false};
};

class InboundConnection;
struct PeerConn;

// State shared by the backend, its listener and its inbound connection workers.
struct Shared {
    NotificationSink* sink = nullptr;
    std::string name;
    uint64_t instance = 0;
    Bytes secret;  // this engine's capability (auth.h)
    RegionTable regions;
    ThreadGroup* threads = nullptr;  // the engine's; outlives every thread it starts
    std::atomic<bool> stopping{false};
    Fd listen_fd;
    Fd wake_fd;
    uint32_t spin_us = 0;  // TcpConfig::spin_us: the listener's busy-poll after a readiness (spin.h)

    // Initiator side: every connection this backend made, stopped by shutdown().
    std::mutex peer_conns_mutex;
    std::vector<std::weak_ptr<PeerConn>> peer_conns;

    // Inbound connections (server.cc): in `epoll_fd` (level-triggered) except while a
    // worker serves one; the listener serves small frames itself and hands the rest to a
    // pool of workers that grows only with connections busy at the same time (at most
    // kMaxWorkers), never with connected ones.
    Fd epoll_fd;
    std::mutex mutex;
    std::condition_variable cv;
    std::unordered_map<int, std::shared_ptr<InboundConnection>> conns;  // by fd
    std::deque<std::shared_ptr<InboundConnection>> ready;
    std::vector<std::thread> workers;  // children of the listener thread, which joins them
    size_t idle_workers = 0;

    std::mutex fence_mutex;
    std::multimap<std::pair<uint64_t, uint64_t>, std::weak_ptr<InboundFence>> fences;  // (instance, link)

    // Registers a new connection of (initiator, link), fencing off its older ones (server.cc).
    std::shared_ptr<InboundFence> newFence(uint64_t initiator, uint64_t link);
};

// The listener thread: accepts connections and hands the readable ones to the worker pool
// until `sh->stopping`; then wakes and joins the workers and closes every connection.
void listenLoop(const std::shared_ptr<Shared>& sh);

// ---- initiator side ------------------------------------------------------------------------

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
    bool committed = false;      // commitNow() succeeded: ends only on ACK or connection loss
    bool stopped_early = false;  // READ: abandoned before every request was sent
    bool acked = false;          // WRITE: the ACK came while the sender still held it (inline)
    // Sent by the posting thread (inline path): its waiter reads the ACK itself, so the
    // receiver leaves it alone until `grace_until` (Progress, backend.h).
    bool inline_job = false;
    Clock::time_point grace_until{};
    Status ack_status;
    uint32_t reads_outstanding = 0;  // READ_REQ frames not answered yet
    Status error;                    // READ: first failure
};

struct ReadBatch {
    uint64_t job;
    uint64_t first, end, bytes;
};

// The read side of a session is led by one thread at a time (guarded by PeerConn::mutex):
// the receiver thread, or a caller waiting on its inline job that reads its own ACK. The
// receiver reads only while something needs it (receiverNeeded); otherwise it sleeps in
// poll() on `wake` and on the socket's hang-up, not on its data, so an ACK read by a
// waiting caller wakes no other thread.
enum class Reader : uint8_t { kNone, kReceiver, kCaller };

struct Session {
    Fd fd;
    Fd wake;  // eventfd: the receiver has work (wakeReceiver)
    std::atomic<bool> dead{false};
    // Only the reader touches these: bytes read from the socket, not parsed yet.
    std::vector<uint8_t> rx;
    size_t rx_len = 0;
    // Guarded by PeerConn::mutex.
    Reader reader = Reader::kNone;
    bool hup = false;  // the socket hung up or failed: the receiver must read it
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
    Bytes peer_secret;  // proves the connection to the peer (its descriptor's secret)
    uint64_t link = 0;  // random; HELLO carries it, the target fences by it

    std::atomic<bool> stopping{false};
    std::mutex mutex;
    std::condition_variable cv;  // queue, read window, stop
    std::deque<SendItem> queue;
    std::deque<SendItem> commits;  // READ notifications whose data arrived: sent first
    std::shared_ptr<Session> session;
    uint64_t next_notify_seq = 1;
    // A thread is writing to the socket: the sender thread (around each item) or a posting
    // thread on the inline path (sendInline). The sender waits while it is set.
    bool writing = false;
    // The waiting caller's busy-poll for its inline job's ACK (TcpConfig::spin_us, spin.h).
    // Budget set before the connection is shared; then used only by the thread that leads
    // the read side as Reader::kCaller (taking that role under `mutex` orders the uses).
    AdaptiveSpin caller_spin;

    // The sender and each session's receiver are threads of this group (the engine's,
    // which joins them); they hold the PeerConn, never the backend.
    ThreadGroup* threads = nullptr;

    std::string label() const { return "tcp peer '" + peer_name + "'"; }
};

// Tells the connection's threads to stop (the sender ends what is queued, the receiver
// what the session holds) and breaks its socket. Never blocks; idempotent.
void stopConnection(PeerConn& c);

// The import of a peer's region: the tag its WRITE / READ_REQ frames name.
struct TcpRemoteRegion final : BackendRemoteRegion {
    uint64_t tag = 0;
};

struct TcpPeer final : BackendPeer {
    std::shared_ptr<PeerConn> conn;
    ~TcpPeer() override;
};

// ---- hand-offs between sender and receiver (session.cc) ----------------------------------

// Finishes every (job, status) of `list` and clears it; call outside c.mutex.
void finishAll(std::vector<std::pair<std::shared_ptr<TransferJob>, Status>>& list);
// Marks the session dead and breaks the socket; the receiver then fails what it owns.
void killSession(PeerConn& c, Session& s, Status why);
// Decides the end of a READ whose requests are all sent and answered. Under c.mutex;
// fills `finish` or queues the notification.
void completeRead(PeerConn& c, const std::shared_ptr<Session>& s, std::map<uint64_t, Pending>::iterator it,
                  std::vector<std::pair<std::shared_ptr<TransferJob>, Status>>& finish);
// The sender lets go of a job it was streaming.
void releaseStreaming(PeerConn& c, const std::shared_ptr<Session>& s, uint64_t id, bool stopped_early,
                      Status error = {});

// ---- receiver.cc -------------------------------------------------------------------------

// Makes `fd` the connection's live session and starts its receiver thread; kCanceled
// (and nothing started) once the engine is closing.
Status startSession(const std::shared_ptr<PeerConn>& c, Fd fd);
// Tells a session's receiver there is work for it (a queued job, a notification, bytes a
// caller left); cheap when it is reading already.
void wakeReceiver(Session& s);
// The Progress of tcp's inline jobs: the waiting caller reads the connection's frames
// while no other thread does (backend.h).
TransferJob::Progress& inlineProgress();
// How long the receiver leaves an inline job's ACK to its poster before reading it itself.
constexpr auto kCallerGrace = std::chrono::milliseconds(2);
constexpr size_t kRxBufferBytes = 16 * 1024;  // >= one ACK: header + kMaxMessageBytes

// ---- dialer.cc ---------------------------------------------------------------------------

// Opens and handshakes a connection to the peer, trying its addresses in order, until
// `deadline` or until `give_up()` (the job or notification it is for was abandoned).
Result<Fd> dial(const PeerConn& c, Clock::time_point deadline, const std::function<bool()>& give_up = {});

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
        KVXFER_RETURN_IF_ERROR(startSession(c, std::move(fd)));
    }
}

// ---- sender.cc ---------------------------------------------------------------------------

// The sender thread of a connection: runs queued jobs, READ commits and notifications in
// order (commits first) until c->stopping.
void senderLoop(const std::shared_ptr<PeerConn>& c);

// The inline path: a small WRITE (at most kInlineMaxRuns runs) sent by the posting thread as
// one sendmsg (WRITE frame + END), when the connection is live and its sender idle with
// nothing queued. False: declined, nothing sent. True: the job is on the wire (or failed
// with the connection) and ends on its ACK as a queued one does.
// (TcpConfig::inline_max_bytes sets the size, 64 KiB by default.)
constexpr uint64_t kInlineMaxRuns = 32;
bool sendInline(const std::shared_ptr<PeerConn>& c, const std::shared_ptr<TransferJob>& job);

}  // namespace kvxfer::tcp
