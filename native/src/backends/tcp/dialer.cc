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

}  // namespace kvxfer::tcp
