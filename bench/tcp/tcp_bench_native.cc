// Two-process WRITE / READ throughput of the kvxfer TCP backend, without Python: the
// same measurement as tcp_bench.py, as one static binary (fork before any engine exists;
// the descriptor travels through a pipe). Build against the core library:
//
//   cmake -S . -B build/rel -G Ninja -DCMAKE_BUILD_TYPE=Release && ninja -C build/rel kvxfer_core
//   g++ -O2 -std=c++20 -Inative/include bench/tcp/tcp_bench_native.cc \
//       build/rel/native/libkvxfer_core.a -lpthread -o /tmp/tcp_bench_native
//   /tmp/tcp_bench_native [MiB=256] [iterations=10]
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kvxfer/engine.h"

using namespace kvxfer;

template <typename T>
T must(Result<T> r) {
    if (!r.isOk()) {
        std::fprintf(stderr, "%s\n", r.status().toString().c_str());
        std::exit(1);
    }
    return std::move(r).value();
}

static void writeAll(int fd, const void* p, size_t n) {
    while (n) {
        ssize_t k = ::write(fd, p, n);
        if (k <= 0) std::exit(1);
        p = static_cast<const char*>(p) + k;
        n -= static_cast<size_t>(k);
    }
}
static void readAll(int fd, void* p, size_t n) {
    while (n) {
        ssize_t k = ::read(fd, p, n);
        if (k <= 0) std::exit(1);
        p = static_cast<char*>(p) + k;
        n -= static_cast<size_t>(k);
    }
}

int main(int argc, char** argv) {
    const uint64_t bytes = (argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 256) << 20;
    const int iters = argc > 2 ? std::atoi(argv[2]) : 10;
    int to_parent[2], to_child[2];
    if (::pipe(to_parent) != 0 || ::pipe(to_child) != 0) return 1;
    const pid_t child = ::fork();
    if (child == 0) {  // target
        EngineConfig c;
        c.name = "bench-target";
        c.backends = {"tcp"};
        auto eng = must(Engine::create(c));
        std::vector<uint8_t> pool(bytes, 0);
        auto region = must(eng->registerMemory(pool.data(), pool.size(), std::nullopt));
        const Bytes d = eng->descriptor();
        const uint64_t n = d.size();
        writeAll(to_parent[1], &n, 8);
        writeAll(to_parent[1], d.data(), n);
        char cmd;
        readAll(to_child[0], &cmd, 1);  // 'c': send a checksum of the pool
        uint64_t sum = 0;
        for (size_t i = 0; i < pool.size(); i += 8) {
            uint64_t v;
            std::memcpy(&v, pool.data() + i, 8);
            sum = sum * 1099511628211ull + v;
        }
        writeAll(to_parent[1], &sum, 8);
        readAll(to_child[0], &cmd, 1);  // 'x': exit
        eng->close();
        std::_Exit(0);
    }
    EngineConfig c;
    c.name = "bench-initiator";
    c.backends = {"tcp"};
    c.default_timeout = std::chrono::seconds(120);
    auto eng = must(Engine::create(c));
    std::vector<uint8_t> src(bytes);
    std::mt19937_64 rng(1);
    for (size_t i = 0; i < bytes; i += 8) {
        const uint64_t v = rng();
        std::memcpy(src.data() + i, &v, 8);
    }
    auto region = must(eng->registerMemory(src.data(), src.size(), std::nullopt));
    uint64_t n = 0;
    readAll(to_parent[0], &n, 8);
    Bytes d(n);
    readAll(to_parent[0], d.data(), n);
    auto peer = must(eng->addPeer(d));
    std::vector<Extent> ext = {{0, bytes}};
    for (Op op : {Op::kWrite, Op::kRead}) {
        std::vector<double> gbps;
        for (int i = 0; i < iters; ++i) {
            TransferRequest r;
            r.op = op;
            r.peer = peer;
            r.local = region;
            r.remote_region = 0;
            r.local_side = ExtentSide{ext};
            r.remote_side = ExtentSide{ext};
            const auto t0 = Clock::now();
            auto job = must(eng->post(r));
            if (job->waitUntil(Clock::time_point::max()) != TransferState::kDone) {
                std::fprintf(stderr, "transfer failed: %s\n", job->status().toString().c_str());
                return 1;
            }
            gbps.push_back(static_cast<double>(bytes) /
                           std::chrono::duration<double>(Clock::now() - t0).count() / 1e9);
        }
        if (op == Op::kWrite) {  // verify: the target's pool equals ours
            writeAll(to_child[1], "c", 1);
            uint64_t remote = 0, local = 0;
            readAll(to_parent[0], &remote, 8);
            for (size_t i = 0; i < src.size(); i += 8) {
                uint64_t v;
                std::memcpy(&v, src.data() + i, 8);
                local = local * 1099511628211ull + v;
            }
            if (remote != local) {
                std::fprintf(stderr, "WRITE verification failed\n");
                return 1;
            }
        }
        std::sort(gbps.begin(), gbps.end());
        std::printf(
            "kvxfer tcp %s two processes (C++ driver), %llu MiB x %d: best %.2f GB/s, median %.2f GB/s\n",
            opName(op), static_cast<unsigned long long>(bytes >> 20), iters, gbps.back(),
            gbps[gbps.size() / 2]);
    }
    writeAll(to_child[1], "x", 1);
    ::waitpid(child, nullptr, 0);
    return 0;
}
