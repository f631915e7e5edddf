// CPU cost of Engine::post in the core, without Python: validation, planning
// (coalescing) and submission of one transfer of N block ids, measured with the calling
// thread's CPU clock. The bytes then move on the backend's threads (not counted here).
//
//   build/cpp/bench/kvxfer_post_cost [blocks=100000] [reps=50] [backend=loopback]
// Prints one JSON line per case: median and p90 CPU microseconds per post().
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvxfer/engine.h"

using namespace kvxfer;

namespace {

double threadCpuMicros() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

template <typename T>
T must(Result<T> r) {
    if (!r.isOk()) {
        std::fprintf(stderr, "%s\n", r.status().toString().c_str());
        std::exit(1);
    }
    return std::move(r).value();
}

}  // namespace

int main(int argc, char** argv) {
    const uint64_t blocks = argc > 1 ? std::stoull(argv[1]) : 100000;
    const int reps = argc > 2 ? std::stoi(argv[2]) : 50;
    const std::string backend = argc > 3 ? argv[3] : "loopback";
    const uint64_t block_bytes = 64;

    EngineConfig ca, cb;
    ca.name = "a";
    cb.name = "b";
    ca.backends = cb.backends = {backend};
    auto a = must(Engine::create(ca));
    auto b = must(Engine::create(cb));
    KvLayout layout;
    layout.num_blocks = blocks;
    layout.block_bytes = block_bytes;
    layout = layout.normalized();
    std::vector<uint8_t> src(blocks * block_bytes, 1), dst(blocks * block_bytes, 0);
    auto ra = must(a->registerMemory(src.data(), src.size(), layout));
    auto rb = must(b->registerMemory(dst.data(), dst.size(), layout));
    auto peer = must(a->addPeer(b->descriptor()));

    std::mt19937_64 rng(1);
    std::vector<int64_t> random_ids(blocks), sequential_ids(blocks);
    std::iota(sequential_ids.begin(), sequential_ids.end(), 0);
    random_ids = sequential_ids;
    std::shuffle(random_ids.begin(), random_ids.end(), rng);

    for (const auto& [name, ids] : {std::pair<const char*, std::vector<int64_t>&>{"random", random_ids},
                                    {"sequential", sequential_ids}}) {
        for (bool coalesce : {true, false}) {
            std::vector<double> cpu;
            for (int r = 0; r < reps; ++r) {
                TransferRequest req;
                req.op = Op::kWrite;
                req.peer = peer;
                req.local = ra;
                req.remote_region = rb->id();
                req.local_side = BlockSide{{}, ids};
                req.remote_side = BlockSide{{}, ids};
                req.coalesce = coalesce;
                const double t0 = threadCpuMicros();
                auto job = must(a->post(req));
                const double t1 = threadCpuMicros();
                cpu.push_back(t1 - t0);
                job->waitUntil(Clock::now() + std::chrono::seconds(60));
            }
            std::sort(cpu.begin(), cpu.end());
            std::printf(
                "{\"bench\":\"post_cost\",\"backend\":\"%s\",\"blocks\":%llu,\"ids\":\"%s\",\"coalesce\":%s,"
                "\"reps\":%d,\"cpu_us_median\":%.1f,\"cpu_us_p90\":%.1f,\"cpu_us_min\":%.1f}\n",
                backend.c_str(), static_cast<unsigned long long>(blocks), name, coalesce ? "true" : "false",
                reps, cpu[cpu.size() / 2], cpu[cpu.size() * 9 / 10], cpu.front());
        }
    }
    a->close();
    b->close();
    return 0;
}
