// TCP backend: socket options (buffer sizes, keepalive, user timeout) and small helpers
// shared by both sides (address text, errno text, deadlines, wire status codes).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cstring>

#include "backends/tcp/tcp_internal.h"
#include "util/proc_file.h"

namespace kvxfer::tcp {

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

namespace {

// The n-th (0-based) number of a /proc/sys file; 0 when unreadable.
long readSysctl(const char* path, int index = 0) {
    return static_cast<long>(procfs::readNumber(path, index).value_or(0));
}

}  // namespace

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

bool pastDeadline(Clock::time_point deadline, Clock::time_point now, Clock::duration grace) {
    return now > deadline && now - deadline > grace;
}

Status statusFromWire(uint32_t code, const std::string& message) {
    if (code == 0 || code > static_cast<uint32_t>(StatusCode::kBackPressure)) {
        return Status::remote(message.empty() ? "tcp peer reported an unknown failure" : message);
    }
    return {static_cast<StatusCode>(code), message};
}

}  // namespace kvxfer::tcp
