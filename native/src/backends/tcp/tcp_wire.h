// TCP backend: wire format and socket helpers. Private to native/src/backends/tcp.
//
// Every frame starts with a fixed 32-byte little-endian header:
//
//   offset 0  u16 magic 0x544b ("KT")   offset 2  u8 version   offset 3  u8 type
//   offset 4  u32 aux                   offset 8  u64 job
//   offset 16 u64 a                     offset 24 u64 b
//
// followed by a body whose size is a function of the header, checked against the limits
// below before anything is read. Initiator -> target:
//
//   HELLO      job = initiator instance, a = expected target instance, b = link id (random
//              per initiator connection object: what fencing keys on), aux = name length;
//              body: initiator engine name, then a 32-byte initiator nonce.
//   PROOF      b = 32; body: HMAC-SHA256(target secret, "kvxfer-tcp-initiator\0" || target
//              nonce || initiator nonce || u64 initiator instance || u64 link || name).
//   WRITE      job, a = region tag (the target region's remote key), aux = run count n,
//              b = payload bytes; body: n x (u64 address, u64 length) then the payloads of
//              those runs, concatenated. Every run lies in the region the tag names.
//   END        job, aux = flags (kEndNotify, kEndAbort), b = notification length; body:
//              the notification. Ends a WRITE (and carries a READ's notification).
//   READ_REQ   job, a = region tag, aux = run count n, b = total bytes; body: n x (u64
//              address, u64 length).
//   NOTIFY     job = sequence number, b = payload length; body: the payload.
//
// Target -> initiator:
//
//   CHALLENGE  b = 64; body: 32-byte target nonce, then HMAC-SHA256(target secret,
//              "kvxfer-tcp-target\0" || initiator nonce || target nonce) (the target
//              proves the secret too). Sent only when HELLO named this instance.
//   HELLO_ACK  aux = status code, job = target instance (0 when refused), b = message
//              length; body: message. Ends the handshake: after PROOF (OK, or refused),
//              or at once for a HELLO naming another instance (refused, the right
//              instance is not told). A refused connection is closed.
//
// Until HELLO_ACK(OK) the target acts on nothing else; its error replies never carry
// addresses, region bounds, tags or instance ids (docs/security.md).
//   ACK        job, aux = status code, b = message length; body: message. Answers an END
//              without kEndAbort, after the notification was delivered.
//   READ_DATA  job, aux = status code, b = body length; body: the requested bytes in run
//              order (status OK) or an error message. Answers one READ_REQ, in order.
//   NOTIFY_ACK job = sequence number, aux = status code, b = message length; body: message.
#pragma once

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvxfer/status.h"
#include "util/scoped_fd.h"

namespace kvxfer::tcp {

constexpr uint16_t kMagic = 0x544b;
constexpr uint8_t kVersion = 2;  // 2: authenticated handshake, region tags
constexpr size_t kHeaderBytes = 32;

enum FrameType : uint8_t {
    kHello = 1,
    kHelloAck = 2,
    kWrite = 3,
    kEnd = 4,
    kReadReq = 5,
    kNotify = 6,
    kAck = 7,
    kReadData = 8,
    kNotifyAck = 9,
    kChallenge = 10,
    kProof = 11,
};

// Labels of the handshake MACs (the trailing NUL is part of each).
constexpr std::string_view kTargetLabel{"kvxfer-tcp-target\0", 18};
constexpr std::string_view kInitiatorLabel{"kvxfer-tcp-initiator\0", 21};

constexpr uint32_t kEndNotify = 1;  // the END carries a notification to deliver
constexpr uint32_t kEndAbort = 2;   // the initiator gave up on the job: no ACK, no delivery

// Limits. A frame exceeding any of them is malformed and closes the connection.
constexpr uint64_t kMaxRunBytes = 8ull << 20;    // BackendCaps::max_run_bytes
constexpr uint64_t kMaxBatchBytes = 8ull << 20;  // payload of one WRITE / READ_REQ
constexpr uint32_t kMaxBatchRuns = 512;          // runs of one WRITE / READ_REQ
constexpr uint64_t kMaxNameBytes = 256;
constexpr uint64_t kMaxNotifyBytes = 64 * 1024;
constexpr uint64_t kMaxMessageBytes = 4096;

struct Header {
    uint8_t type = 0;
    uint32_t aux = 0;
    uint64_t job = 0;
    uint64_t a = 0;
    uint64_t b = 0;
};

inline void putLe(uint8_t* p, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint64_t getLe(const uint8_t* p, int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
    return v;
}

inline void encodeHeader(const Header& h, uint8_t* out) {
    putLe(out, kMagic, 2);
    out[2] = kVersion;
    out[3] = h.type;
    putLe(out + 4, h.aux, 4);
    putLe(out + 8, h.job, 8);
    putLe(out + 16, h.a, 8);
    putLe(out + 24, h.b, 8);
}

// False when the magic or version is wrong.
inline bool decodeHeader(const uint8_t* in, Header* h) {
    if (getLe(in, 2) != kMagic || in[2] != kVersion) return false;
    h->type = in[3];
    h->aux = static_cast<uint32_t>(getLe(in + 4, 4));
    h->job = getLe(in + 8, 8);
    h->a = getLe(in + 16, 8);
    h->b = getLe(in + 24, 8);
    return true;
}

// Appends a header (and optionally a body) to `out`.
inline void appendFrame(std::vector<uint8_t>& out, const Header& h, const void* body = nullptr,
                        size_t n = 0) {
    const size_t at = out.size();
    out.resize(at + kHeaderBytes + n);
    encodeHeader(h, out.data() + at);
    if (n) std::memcpy(out.data() + at + kHeaderBytes, body, n);
}

// A list of buffers consumed front to back by partial sends / receives.
class IovCursor {
public:
    void clear() {
        iov_.clear();
        index_ = 0;
    }
    void add(void* base, size_t len) {
        if (len) iov_.push_back({base, len});
    }
    bool empty() const { return index_ == iov_.size(); }
    iovec* data() { return iov_.data() + index_; }
    size_t count() const { return std::min<size_t>(iov_.size() - index_, 1024); }  // IOV_MAX
    size_t remaining() const {
        size_t n = 0;
        for (size_t i = index_; i < iov_.size(); ++i) n += iov_[i].iov_len;
        return n;
    }
    void advance(size_t n) {
        while (n > 0 && index_ < iov_.size()) {
            iovec& v = iov_[index_];
            const size_t step = std::min(n, v.iov_len);
            v.iov_base = static_cast<uint8_t*>(v.iov_base) + step;
            v.iov_len -= step;
            n -= step;
            if (v.iov_len == 0) ++index_;
        }
    }

private:
    std::vector<iovec> iov_;
    size_t index_ = 0;
};

// Connected sockets are blocking with SO_SNDTIMEO / SO_RCVTIMEO of one slice, so a call
// sleeps in the kernel (no poll round trip per wake-up) yet returns at least every slice;
// shutdown() from another thread wakes it at once.
constexpr int kPollSliceMs = 50;

inline void setSliceTimeouts(int fd) {
    timeval tv{0, kPollSliceMs * 1000};
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

// Moves every byte of `cur` through the connected socket `fd` (set up with
// setSliceTimeouts). `check(idle)` runs after each partial transfer (idle = false) and
// after each slice without progress (idle = true); a non-OK status from it aborts the
// loop and is returned. A closed or reset connection returns kPeerUnreachable; the
// iovecs are advanced past what moved either way.
template <typename Check>
Status moveAll(int fd, bool sending, IovCursor& cur, Check&& check, const char* what) {
    while (!cur.empty()) {
        msghdr msg{};
        msg.msg_iov = cur.data();
        msg.msg_iovlen = cur.count();
        // MSG_WAITALL: one call per frame while data flows; the timeout still bounds it.
        const ssize_t k = sending ? ::sendmsg(fd, &msg, MSG_NOSIGNAL) : ::recvmsg(fd, &msg, MSG_WAITALL);
        if (k > 0) {
            cur.advance(static_cast<size_t>(k));
            Status st = check(false);
            if (!st.isOk()) return st;
            continue;
        }
        if (k == 0) return Status::peerUnreachable(std::string(what) + ": connection closed by the peer");
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            Status st = check(true);
            if (!st.isOk()) return st;
            continue;
        }
        const int err = errno;
        return Status::peerUnreachable(std::string(what) + ": " + std::strerror(err) + " (errno " +
                                       std::to_string(err) + ")");
    }
    return Status::ok();
}

template <typename Check>
Status sendBytes(int fd, const void* data, size_t n, Check&& check, const char* what) {
    IovCursor cur;
    cur.add(const_cast<void*>(data), n);
    return moveAll(fd, true, cur, check, what);
}

template <typename Check>
Status recvBytes(int fd, void* data, size_t n, Check&& check, const char* what) {
    IovCursor cur;
    cur.add(data, n);
    return moveAll(fd, false, cur, check, what);
}

}  // namespace kvxfer::tcp
