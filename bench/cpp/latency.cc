// Latency of one small transfer at a time through the C++ API: post + wait of one extent
// of `bytes` between two engines of this process (same code path as two processes for
// tcp; for shm the peer's memory is kvxfer HostBuffer memory, the mapped fast path).
// Reports the request rate and per-request latency percentiles, plus the split of one
// request into post() and wait().
//
//   build/cpp/tests/cpp/kvxfer_latency [backend=shm] [bytes=4096] [iters=20000] [depth=1]
// Baselines of the same bytes, one request at a time (backend names):
//   socket-pingpong: a plain TCP ping-pong over 127.0.0.1 between two threads: a 32-byte
//                    header + the bytes one way, a 32-byte answer back (TCP_NODELAY);
//   epoll-pingpong:  the same, the server waiting in epoll_wait then reading (an event loop);
//   wake-pingpong:   an eventfd ping-pong between two threads plus a memcpy of the bytes.
// Prints one JSON line.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
#include <thread>
#include <vector>

#include "kvxfer/engine.h"
#include "kvxfer/host_memory.h"

using namespace kvxfer;

namespace {

template <typename T>
T must(Result<T> r) {
    if (!r.isOk()) {
        std::fprintf(stderr, "%s\n", r.status().toString().c_str());
        std::exit(1);
    }
    return std::move(r).value();
}

double us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

double pct(std::vector<double> v, double q) {
    if (v.empty()) return -1.0;
    std::sort(v.begin(), v.end());
    return v[std::min(v.size() - 1, static_cast<size_t>(q * v.size()))];
}

bool full(ssize_t (*io)(int, void*, size_t, int), int fd, void* p, size_t n) {
    auto* b = static_cast<uint8_t*>(p);
    while (n > 0) {
        const ssize_t k = io(fd, b, n, 0);
        if (k <= 0) return false;
        b += k;
        n -= static_cast<size_t>(k);
    }
    return true;
}
ssize_t sendIo(int fd, void* p, size_t n, int f) { return ::send(fd, p, n, f | MSG_NOSIGNAL); }
ssize_t recvIo(int fd, void* p, size_t n, int f) { return ::recv(fd, p, n, f); }

// A baseline: `iters` round trips of `bytes`, one at a time; fills per-request latencies.
double baseline(const std::string& kind, uint64_t bytes, int iters, std::vector<double>& lat) {
    std::vector<uint8_t> src(bytes + 32, 1), dst(bytes + 32, 0);
    const int warm = std::min(iters, 1000);
    Clock::time_point t0;
    if (kind == "socket-pingpong" || kind == "epoll-pingpong") {
        const int ls = ::socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t len = sizeof(addr);
        if (::bind(ls, reinterpret_cast<sockaddr*>(&addr), len) != 0 || ::listen(ls, 1) != 0 ||
            ::getsockname(ls, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
            std::perror("socket baseline");
            std::exit(1);
        }
        std::thread server([&] {
            const int c = ::accept(ls, nullptr, nullptr);
            const int one = 1;
            ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            uint8_t ack[32] = {};
            if (kind == "epoll-pingpong") {
                // The server waits in epoll_wait, then reads what is there: an event loop's
                // wake-up (kvxfer's tcp listener serves small frames this way).
                const int ep = ::epoll_create1(0);
                epoll_event ev{};
                ev.events = EPOLLIN;
                ev.data.fd = c;
                ::epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                size_t have = 0;
                for (;;) {
                    epoll_event got[8];
                    if (::epoll_wait(ep, got, 8, -1) < 1) break;
                    const ssize_t k = ::recv(c, dst.data() + have, bytes + 32 - have, MSG_DONTWAIT);
                    if (k <= 0) break;
                    have += static_cast<size_t>(k);
                    if (have < bytes + 32) continue;
                    have = 0;
                    if (!full(sendIo, c, ack, sizeof(ack))) break;
                }
                ::close(ep);
            } else {
                while (full(recvIo, c, dst.data(), bytes + 32)) {
                    if (!full(sendIo, c, ack, sizeof(ack))) break;
                }
            }
            ::close(c);
        });
        const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
        const int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
            std::perror("connect");
            std::exit(1);
        }
        uint8_t ack[32];
        for (int i = -warm; i < iters; ++i) {
            if (i == 0) t0 = Clock::now();
            const auto s = Clock::now();
            if (!full(sendIo, fd, src.data(), bytes + 32) || !full(recvIo, fd, ack, sizeof(ack)))
                std::exit(1);
            if (i >= 0) lat.push_back(us(Clock::now() - s));
        }
        const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
        ::shutdown(fd, SHUT_RDWR);
        ::close(fd);
        server.join();
        ::close(ls);
        return secs;
    }
    // wake-pingpong: the other thread copies the bytes, as a copy thread would, and answers.
    const int to = ::eventfd(0, 0), back = ::eventfd(0, 0);
    std::thread peer([&] {
        uint64_t v = 0;
        for (;;) {
            if (::read(to, &v, 8) != 8 || v == 2) break;
            std::memcpy(dst.data(), src.data(), bytes);
            const uint64_t one = 1;
            (void)!::write(back, &one, 8);
        }
    });
    for (int i = -warm; i < iters; ++i) {
        if (i == 0) t0 = Clock::now();
        const auto s = Clock::now();
        const uint64_t one = 1;
        uint64_t v = 0;
        (void)!::write(to, &one, 8);
        (void)!::read(back, &v, 8);
        if (i >= 0) lat.push_back(us(Clock::now() - s));
    }
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    const uint64_t two = 2;
    (void)!::write(to, &two, 8);
    peer.join();
    ::close(to);
    ::close(back);
    return secs;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string backend = argc > 1 ? argv[1] : "shm";
    const uint64_t bytes = argc > 2 ? std::stoull(argv[2]) : 4096;
    const int iters = argc > 3 ? std::stoi(argv[3]) : 20000;
    const int depth = argc > 4 ? std::max(1, std::stoi(argv[4])) : 1;
    if (backend == "socket-pingpong" || backend == "epoll-pingpong" || backend == "wake-pingpong") {
        std::vector<double> lat;
        const double secs = baseline(backend, bytes, iters, lat);
        std::printf(
            "{\"bench\":\"latency_cpp\",\"backend\":\"%s\",\"bytes\":%llu,\"depth\":1,\"iters\":%d,"
            "\"req_per_s\":%.0f,\"p50_us\":%.2f,\"p99_us\":%.2f}\n",
            backend.c_str(), static_cast<unsigned long long>(bytes), iters, iters / secs, pct(lat, 0.5),
            pct(lat, 0.99));
        return 0;
    }

    EngineConfig ca, cb;
    ca.name = "lat-a";
    cb.name = "lat-b";
    ca.backends = cb.backends = {backend};
    auto a = must(Engine::create(ca));
    auto b = must(Engine::create(cb));
    const uint64_t slots = 64;
    auto src = must(HostBuffer::allocate(bytes * slots));
    auto dst = must(HostBuffer::allocate(bytes * slots));
    for (uint64_t i = 0; i < bytes * slots; ++i) src->data()[i] = static_cast<uint8_t>(i * 7 + 1);
    auto ra = must(a->registerMemory({src->data(), src->size(), MemoryKind::kHost, -1}, std::nullopt));
    auto rb = must(b->registerMemory({dst->data(), dst->size(), MemoryKind::kHost, -1}, std::nullopt));
    auto peer = must(a->addPeer(b->descriptor()));

    std::vector<Extent> local(slots), remote(slots);
    for (uint64_t i = 0; i < slots; ++i) {
        local[i] = {i * bytes, bytes};
        remote[i] = {i * bytes, bytes};
    }
    auto request = [&](int i) {
        TransferRequest req;
        req.op = Op::kWrite;
        req.peer = peer;
        const uint64_t s = static_cast<uint64_t>(i) % slots;
        req.parts.push_back({ra, ExtentSide{{&local[s], 1}}, rb->id(), ExtentSide{{&remote[s], 1}}});
        return req;
    };
    const auto forever = Clock::now() + std::chrono::hours(1);
    auto finish = [&](const Transfer& t) {
        if (t.wait(forever) != TransferState::kDone) {
            std::fprintf(stderr, "transfer failed: %s\n", t.status().toString().c_str());
            std::exit(1);
        }
    };

    for (int i = 0; i < std::min(iters, 1000); ++i) finish(must(a->post(request(i))));  // warm-up

    std::vector<double> lat, post_us, wait_us;
    lat.reserve(iters);
    const auto t0 = Clock::now();
    if (depth == 1) {
        post_us.reserve(iters);
        wait_us.reserve(iters);
        for (int i = 0; i < iters; ++i) {
            const auto s = Clock::now();
            Transfer t = must(a->post(request(i)));
            const auto m = Clock::now();
            finish(t);
            const auto e = Clock::now();
            lat.push_back(us(e - s));
            post_us.push_back(us(m - s));
            wait_us.push_back(us(e - m));
        }
    } else {
        std::deque<std::pair<Transfer, Clock::time_point>> window;
        for (int i = 0; i < iters; ++i) {
            if (static_cast<int>(window.size()) == depth) {
                finish(window.front().first);
                lat.push_back(us(Clock::now() - window.front().second));
                window.pop_front();
            }
            const auto s = Clock::now();
            window.emplace_back(must(a->post(request(i))), s);
        }
        for (auto& [t, s] : window) {
            finish(t);
            lat.push_back(us(Clock::now() - s));
        }
    }
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    if (std::memcmp(src->data(), dst->data(), bytes * std::min<uint64_t>(slots, iters)) != 0) {
        std::fprintf(stderr, "data mismatch\n");
        return 1;
    }
    std::printf(
        "{\"bench\":\"latency_cpp\",\"backend\":\"%s\",\"bytes\":%llu,\"depth\":%d,\"iters\":%d,"
        "\"req_per_s\":%.0f,\"p50_us\":%.2f,\"p99_us\":%.2f,\"post_p50_us\":%.2f,\"wait_p50_us\":%.2f}\n",
        backend.c_str(), static_cast<unsigned long long>(bytes), depth, iters, iters / secs, pct(lat, 0.5),
        pct(lat, 0.99), pct(post_us, 0.5), pct(wait_us, 0.5));
    a->close();
    b->close();
    return 0;
}
