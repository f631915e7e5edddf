// TCP backend, initiator side: dialing a peer (its addresses in order, each with a share of
// the time left) and the HELLO handshake that names both engine instances. Reconnecting is
// `acquire` (tcp_internal.h); the target fences the older connections (server.cc).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>

#include "backends/tcp/tcp_internal.h"

namespace kvxfer::tcp {
namespace {

// The initiator's side of the authenticated handshake (tcp_wire.h): HELLO, CHALLENGE
// (checks the target's proof), PROOF, HELLO_ACK.
template <typename Check>
Status handshake(const PeerConn& c, int fd, Check&& hs_check) {
    if (c.peer_secret.size() != PeerDescriptor::kSecretBytes) {
        return Status::badDescriptor("peer '" + c.peer_name +
                                     "' published no connection secret (a kvxfer older than the "
                                     "authenticated tcp wire)");
    }
    KVXFER_ASSIGN_OR_RETURN(const auth::Nonce mine, auth::randomNonce());
    std::vector<uint8_t> hello;
    appendFrame(hello,
                {.type = kHello,
                 .aux = static_cast<uint32_t>(c.self_name.size()),
                 .job = c.self_instance,
                 .a = c.peer_instance,
                 .b = c.link},
                c.self_name.data(), c.self_name.size());
    hello.insert(hello.end(), mine.begin(), mine.end());
    KVXFER_RETURN_IF_ERROR(sendBytes(fd, hello.data(), hello.size(), hs_check, "hello"));
    // A refusal (HELLO_ACK) or the challenge.
    uint8_t hb[kHeaderBytes];
    Header h;
    auto readAck = [&]() -> Status {
        if (h.b > kMaxMessageBytes)
            return Status::peerUnreachable("not a kvxfer tcp endpoint (bad HELLO reply)");
        std::string msg(h.b, '\0');
        if (h.b) KVXFER_RETURN_IF_ERROR(recvBytes(fd, msg.data(), msg.size(), hs_check, "hello"));
        if (h.aux != 0) return statusFromWire(h.aux, msg);
        if (h.job != c.peer_instance) return Status::peerUnreachable("another engine instance answered");
        return Status::ok();
    };
    KVXFER_RETURN_IF_ERROR(recvBytes(fd, hb, sizeof(hb), hs_check, "hello"));
    if (!decodeHeader(hb, &h)) return Status::peerUnreachable("not a kvxfer tcp endpoint (bad HELLO reply)");
    if (h.type == kHelloAck) {
        Status st = readAck();
        return st.isOk() ? Status::peerUnreachable("peer accepted a HELLO without authentication") : st;
    }
    if (h.type != kChallenge || h.b != 2 * auth::kNonceBytes)
        return Status::peerUnreachable("not a kvxfer tcp endpoint (bad HELLO reply)");
    uint8_t challenge[2 * auth::kNonceBytes];
    KVXFER_RETURN_IF_ERROR(recvBytes(fd, challenge, sizeof(challenge), hs_check, "hello"));
    const ByteView theirs(challenge, auth::kNonceBytes);
    const ByteView their_proof(challenge + auth::kNonceBytes, auth::kMacBytes);
    const auth::Mac expected = auth::mac(c.peer_secret, {auth::view(kTargetLabel), auth::view(mine), theirs});
    if (!auth::equal(auth::view(expected), their_proof)) {
        return Status::peerUnreachable("tcp peer '" + c.peer_name +
                                       "' could not prove its descriptor's secret (another process "
                                       "listens at its address)");
    }
    const uint64_t instance = c.self_instance;
    const uint64_t link = c.link;
    const auth::Mac proof =
        auth::mac(c.peer_secret, {auth::view(kInitiatorLabel), theirs, auth::view(mine), auth::view(instance),
                                  auth::view(link), auth::view(c.self_name)});
    std::vector<uint8_t> out;
    appendFrame(out, {.type = kProof, .b = proof.size()}, proof.data(), proof.size());
    KVXFER_RETURN_IF_ERROR(sendBytes(fd, out.data(), out.size(), hs_check, "hello"));
    KVXFER_RETURN_IF_ERROR(recvBytes(fd, hb, sizeof(hb), hs_check, "hello"));
    if (!decodeHeader(hb, &h) || h.type != kHelloAck)
        return Status::peerUnreachable("not a kvxfer tcp endpoint (bad HELLO reply)");
    return readAck();
}

}  // namespace

// Opens and handshakes a connection to the peer, trying its addresses in order, until
// `deadline` or until `give_up()` (the job or notification it is for was abandoned).
Result<Fd> dial(const PeerConn& c, Clock::time_point deadline, const std::function<bool()>& give_up) {
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
            st = handshake(c, fd.fd, check(deadline));
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

}  // namespace kvxfer::tcp
