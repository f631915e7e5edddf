// Baseline for the TCP backend: the plain socket copy it is compared with. Two processes
// (fork) over one loopback TCP connection, same socket options as the backend (NODELAY,
// the kernel's buffer autotuning). The sender send()s N bytes from a pre-faulted buffer,
// the receiver recv()s them straight into a pre-faulted buffer and answers one byte; the
// time is taken on the sender from the first send to that answer, i.e. until the bytes are
// in the receiver's memory (what a kvxfer WRITE's DONE means).
//
//   g++ -O2 -std=c++20 -o /tmp/tcp_baseline bench/tcp/tcp_baseline.cc
//   /tmp/tcp_baseline [MiB=256] [iterations=10] [socket buffer KiB, 0 = kernel autotuning]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void die(const char* what) {
    std::perror(what);
    std::exit(1);
}

int main(int argc, char** argv) {
    const size_t mib = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 256;
    const int iters = argc > 2 ? std::atoi(argv[2]) : 10;
    const int buf_kib = argc > 3 ? std::atoi(argv[3]) : 0;
    const size_t bytes = mib << 20;
    auto set_buffers = [buf_kib](int fd) {
        if (buf_kib <= 0) return;
        const int n = buf_kib * 1024;
        ::setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &n, sizeof(n));
        ::setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &n, sizeof(n));
    };
    int lfd = ::socket(AF_INET, SOCK_STREAM, 0);
    set_buffers(lfd);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(lfd, 1) != 0)
        die("bind");
    socklen_t len = sizeof(addr);
    ::getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &len);
    const int one = 1;
    const pid_t child = ::fork();
    if (child == 0) {  // receiver
        std::vector<char> buf(bytes, 1);
        int fd = ::accept(lfd, nullptr, nullptr);
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        for (int it = 0; it < iters; ++it) {
            size_t got = 0;
            while (got < bytes) {
                ssize_t k = ::recv(fd, buf.data() + got, bytes - got, 0);
                if (k <= 0) die("recv");
                got += static_cast<size_t>(k);
            }
            char ack = 1;
            if (::send(fd, &ack, 1, 0) != 1) die("send ack");
        }
        std::_Exit(0);
    }
    std::vector<char> buf(bytes, 2);
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    set_buffers(fd);
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) die("connect");
    std::vector<double> gbps;
    for (int it = 0; it < iters; ++it) {
        const auto t0 = std::chrono::steady_clock::now();
        size_t sent = 0;
        while (sent < bytes) {
            ssize_t k = ::send(fd, buf.data() + sent, bytes - sent, 0);
            if (k <= 0) die("send");
            sent += static_cast<size_t>(k);
        }
        char ack;
        if (::recv(fd, &ack, 1, MSG_WAITALL) != 1) die("recv ack");
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        gbps.push_back(static_cast<double>(bytes) / s / 1e9);
    }
    ::waitpid(child, nullptr, 0);
    std::sort(gbps.begin(), gbps.end());
    std::printf("plain TCP loopback copy, %zu MiB x %d, buffers %s: best %.2f GB/s, median %.2f GB/s\n", mib,
                iters, buf_kib > 0 ? (std::to_string(buf_kib) + " KiB").c_str() : "autotuned", gbps.back(),
                gbps[gbps.size() / 2]);
    return 0;
}
