// Latency of one small transfer at a time through the C++ API: post + wait of one extent
// of `bytes` between two engines of this process (same code path as two processes for
// tcp; for shm the peer's memory is kvxfer HostBuffer memory, the mapped fast path).
// Reports the request rate and per-request latency percentiles, plus the split of one
// request into post() and wait().
//
//   build/cpp/bench/kvxfer_latency [backend=shm] [bytes=4096] [iters=20000] [depth=1]
// Prints one JSON line.
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
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

}  // namespace

int main(int argc, char** argv) {
    const std::string backend = argc > 1 ? argv[1] : "shm";
    const uint64_t bytes = argc > 2 ? std::stoull(argv[2]) : 4096;
    const int iters = argc > 3 ? std::stoi(argv[3]) : 20000;
    const int depth = argc > 4 ? std::max(1, std::stoi(argv[4])) : 1;

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
    auto pct = [](std::vector<double> v, double q) {
        if (v.empty()) return -1.0;
        std::sort(v.begin(), v.end());
        return v[std::min(v.size() - 1, static_cast<size_t>(q * v.size()))];
    };
    std::printf(
        "{\"bench\":\"latency_cpp\",\"backend\":\"%s\",\"bytes\":%llu,\"depth\":%d,\"iters\":%d,"
        "\"req_per_s\":%.0f,\"p50_us\":%.2f,\"p99_us\":%.2f,\"post_p50_us\":%.2f,\"wait_p50_us\":%.2f}\n",
        backend.c_str(), static_cast<unsigned long long>(bytes), depth, iters, iters / secs, pct(lat, 0.5),
        pct(lat, 0.99), pct(post_us, 0.5), pct(wait_us, 0.5));
    a->close();
    b->close();
    return 0;
}
