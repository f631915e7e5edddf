// The authenticated notification socket of the same-host backends (shm, cuda_ipc): a
// SOCK_SEQPACKET Unix socket in the abstract namespace per engine, one message per
// notification, and one connection per peer that proves the engine's secret first.
//
// Handshake (one message each; docs/security.md):
//   initiator -> target  HELLO      u32 magic, u64 instance, 32-byte nonce, name
//   target -> initiator  CHALLENGE  u32 magic, 32-byte nonce, HMAC(secret, target label ||
//                                   initiator nonce || target nonce)
//   initiator -> target  PROOF      u32 magic, HMAC(secret, initiator label || target nonce
//                                   || initiator nonce || u64 instance || name)
//   target -> initiator  WELCOME    u32 magic, with the listener's welcome fd (SCM_RIGHTS), if any
// then notifications from the initiator: 'N' + payload, attributed to the name and instance
// proven at connect. The listener closes a connection that breaks the sequence, fails the
// proof, or comes from another uid (SO_PEERCRED); it serves at most kMaxConnections. The
// labels are "kvxfer-<backend>-target\0" and "kvxfer-<backend>-initiator\0", so a proof is
// valid on one backend only.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kvxfer/backend.h"
#include "util/auth.h"
#include "util/scoped_fd.h"
#include "util/thread_group.h"

namespace kvxfer::notify_socket {

constexpr uint8_t kNotifyMessage = 'N';
constexpr size_t kMaxMessage = 64 * 1024 + 512;
constexpr size_t kMaxConnections = 4096;

// Which backend speaks: its name (labels, error texts) and its handshake magic.
struct Protocol {
    std::string backend;
    uint32_t magic = 0;
    std::string targetLabel() const { return "kvxfer-" + backend + "-target" + std::string(1, '\0'); }
    std::string initiatorLabel() const { return "kvxfer-" + backend + "-initiator" + std::string(1, '\0'); }
};

// 'N' + payload: a notification on an authenticated connection.
Bytes notificationMessage(ByteView payload);

// The target side: the listening socket, the handshake, and delivery to the sink with
// back-pressure (a notification the sink refuses with kBackPressure is held and its
// connection is not read until the sink has room: the sender's socket fills, and its
// notifications wait or end at their deadlines; nothing is dropped). One thread, of the
// engine's ThreadGroup (which joins it).
class Listener : public std::enable_shared_from_this<Listener> {
public:
    // Binds @`name`. `welcome_fd` (or -1) is passed to every authenticated peer; `owner`
    // keeps it open while the listener lives.
    static Result<std::shared_ptr<Listener>> start(ThreadGroup& threads, Protocol protocol,
                                                   const std::string& name, Bytes secret,
                                                   NotificationSink* sink, int welcome_fd = -1,
                                                   std::shared_ptr<const void> owner = nullptr);
    // Tells the thread to close every connection and return (idempotent; never blocks).
    void stop();
    const std::string& name() const { return name_; }

private:
    struct Conn {
        enum State : uint8_t { kHello, kProof, kOpen } state = kHello;
        auth::Nonce mine{};
        Bytes theirs;
        uint64_t instance = 0;
        std::string name;
        // The sink's queue was full: this notification waits and the socket is not read.
        std::optional<Bytes> held;
    };
    Listener() = default;
    void run();
    void accept();
    bool onMessage(int fd, Conn& conn, const uint8_t* m, size_t k);
    bool offer(int fd, Conn& conn, Bytes payload);
    void pause(int fd, Conn& conn, Bytes payload);
    void resumeHeld();
    void drop(int fd);

    Protocol protocol_;
    std::string name_;
    Bytes secret_;
    NotificationSink* sink_ = nullptr;
    int welcome_fd_ = -1;
    std::shared_ptr<const void> owner_;
    Fd listen_fd_, stop_fd_, room_fd_, epoll_fd_;
    std::unordered_map<int, Conn> conns_;
};

// The initiator side: connects to @`name` (non-blocking socket), proves `peer.secret`,
// checks the target's proof, and returns the socket. `welcome_fd` receives the fd the
// target passes (shm: its export table), if asked. kPeerUnreachable when the target is not
// there, refuses, or cannot prove the secret; kTimeout at `deadline`.
Result<Fd> connect(const Protocol& protocol, const std::string& name, const PeerIdentity& peer,
                   uint64_t self_instance, const std::string& self_name, Clock::time_point deadline,
                   Fd* welcome_fd = nullptr);

// One non-blocking send of a whole message: kOk, kNoRoom (EAGAIN), or kError (`error` set).
enum class Sent : uint8_t { kOk, kNoRoom, kError };
Sent trySend(int fd, const Bytes& msg, const Protocol& protocol, const std::string& peer_name, Status* error);

class Notifier;

// The sending side of one authenticated connection. A notification goes out at once when
// the peer's socket has room and nothing waits before it; otherwise it joins this peer's
// outbox, which the backend's Notifier thread sends as room appears and ends at each
// entry's deadline. So the thread that finished a transfer never waits for a peer: a
// stopped peer costs queue entries, not a worker serving other peers.
class Sender : public std::enable_shared_from_this<Sender> {
public:
    Sender(Protocol protocol, std::string peer_name, Fd fd, std::shared_ptr<Notifier> notifier)
        : protocol_(std::move(protocol)),
          peer_name_(std::move(peer_name)),
          fd_(std::move(fd)),
          notifier_(std::move(notifier)) {}
    // A transfer's notification (job->notify): the status if it ended now (sent or failed),
    // nullopt if queued (the notifier then calls job->finish()).
    std::optional<Status> sendForJob(const std::shared_ptr<TransferJob>& job);
    // A standalone notification: returns once sent, failed, or at `deadline` (kTimeout).
    Status send(ByteView payload, Clock::time_point deadline);
    int fd() const { return fd_.fd; }

private:
    friend class Notifier;
    struct Outgoing {
        std::shared_ptr<TransferJob> job;  // null for a standalone send()
        Bytes msg;
        Clock::time_point deadline;
        // Standalone send(): the caller waits for `result`.
        std::shared_ptr<std::pair<std::mutex, std::condition_variable>> sync;
        std::shared_ptr<std::optional<Status>> result;
    };
    std::optional<Status> sendOrQueue(Outgoing out);
    // Sends what fits of the outbox, ends expired entries; true when the outbox is empty.
    bool drain(Clock::time_point now, Clock::time_point* next_deadline);
    static void complete(Outgoing& out, Status st);
    void cancelAll(const Status& why);

    Protocol protocol_;
    std::string peer_name_;
    Fd fd_;
    std::shared_ptr<Notifier> notifier_;
    std::mutex mutex_;
    std::deque<Outgoing> outbox_;  // not sent yet, in order; while non-empty, new ones queue behind
};

// The one thread per backend (of the engine's ThreadGroup) that sends queued notifications
// when their peer's socket has room again, and ends each at its deadline if it never does.
class Notifier {
public:
    // Null when the group refuses a new thread (the engine is closing).
    static std::shared_ptr<Notifier> start(ThreadGroup& threads);
    // The thread ends what is still queued (kCanceled) and returns; what is queued later
    // ends at once. Never blocks.
    void stop();
    void watch(std::shared_ptr<Sender> sender);

private:
    Notifier();
    void wake();
    void run();

    Fd wake_;
    std::mutex mutex_;
    bool stopping_ = false;
    std::vector<std::shared_ptr<Sender>> fresh_;  // newly non-empty outboxes
};

}  // namespace kvxfer::notify_socket
