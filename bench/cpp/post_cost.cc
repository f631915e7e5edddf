// CPU cost of Engine::post in the core, without Python: validation, planning
// (coalescing) and submission of one transfer of N block ids, measured with the calling
// thread's CPU clock. The bytes then move on the backend's threads (not counted here).
//
//   build/cpp/bench/kvxfer_post_cost [blocks=100000] [reps=50] [backend=loopback]
// Prints one JSON line per case: median and p90 CPU microseconds per post().
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <functional>
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
    auto ra = must(a->registerMemory({src.data(), src.size(), MemoryKind::kHost, -1}, layout));
    auto rb = must(b->registerMemory({dst.data(), dst.size(), MemoryKind::kHost, -1}, layout));
    auto peer = must(a->addPeer(b->descriptor()));

    // Thread CPU time of Engine::post for `reps` posts of what `build` fills in, sorted.
    auto timePosts = [&](const std::function<void(TransferRequest&)>& build) {
        std::vector<double> cpu;
        for (int r = 0; r < reps; ++r) {
            TransferRequest req;
            req.op = Op::kWrite;
            req.peer = peer;
            build(req);
            const double t0 = threadCpuMicros();
            auto job = must(a->post(req));
            const double t1 = threadCpuMicros();
            cpu.push_back(t1 - t0);
            job.wait(Clock::now() + std::chrono::seconds(60));
        }
        std::sort(cpu.begin(), cpu.end());
        return cpu;
    };

    std::mt19937_64 rng(1);
    std::vector<int64_t> random_ids(blocks), sequential_ids(blocks);
    std::iota(sequential_ids.begin(), sequential_ids.end(), 0);
    random_ids = sequential_ids;
    std::shuffle(random_ids.begin(), random_ids.end(), rng);

    for (const auto& [name, ids] : {std::pair<const char*, std::vector<int64_t>&>{"random", random_ids},
                                    {"sequential", sequential_ids}}) {
        for (bool coalesce : {true, false}) {
            const auto cpu = timePosts([&](TransferRequest& req) {
                req.parts.push_back({ra, BlockSide{{}, ids}, rb->id(), BlockSide{{}, ids}});
                req.coalesce = coalesce;
            });
            std::printf(
                "{\"bench\":\"post_cost\",\"backend\":\"%s\",\"blocks\":%llu,\"ids\":\"%s\",\"coalesce\":%s,"
                "\"reps\":%d,\"cpu_us_median\":%.1f,\"cpu_us_p90\":%.1f,\"cpu_us_min\":%.1f}\n",
                backend.c_str(), static_cast<unsigned long long>(blocks), name, coalesce ? "true" : "false",
                reps, cpu[cpu.size() / 2], cpu[cpu.size() * 9 / 10], cpu.front());
        }
    }

    // One transfer across many regions, as a vLLM connector posts it: one region per layer
    // for K and one for V, the same random block ids in each.
    {
        const uint64_t regions = 128, pool_blocks = 2048, moved = 512;
        KvLayout per_tensor;
        per_tensor.num_blocks = pool_blocks;
        per_tensor.block_bytes = block_bytes;
        per_tensor = per_tensor.normalized();
        std::vector<std::vector<uint8_t>> amem(regions), bmem(regions);
        std::vector<std::shared_ptr<Region>> aregs, bregs;
        for (uint64_t i = 0; i < regions; ++i) {
            amem[i].assign(pool_blocks * block_bytes, 1);
            bmem[i].assign(pool_blocks * block_bytes, 0);
            aregs.push_back(
                must(a->registerMemory({amem[i].data(), amem[i].size(), MemoryKind::kHost, -1}, per_tensor)));
            bregs.push_back(
                must(b->registerMemory({bmem[i].data(), bmem[i].size(), MemoryKind::kHost, -1}, per_tensor)));
        }
        peer = must(a->addPeer(b->descriptor()));  // refresh: the new regions
        std::vector<int64_t> ids(pool_blocks);
        std::iota(ids.begin(), ids.end(), 0);
        std::shuffle(ids.begin(), ids.end(), rng);
        ids.resize(moved);
        const auto cpu = timePosts([&](TransferRequest& req) {
            for (uint64_t i = 0; i < regions; ++i) {
                req.parts.push_back({aregs[i], BlockSide{{}, ids}, bregs[i]->id(), BlockSide{{}, ids}});
            }
        });
        std::printf(
            "{\"bench\":\"post_cost_multi_region\",\"backend\":\"%s\",\"regions\":%llu,\"blocks\":%llu,"
            "\"ids\":\"random\",\"reps\":%d,\"cpu_us_median\":%.1f,\"cpu_us_p90\":%.1f,\"cpu_us_min\":%.1f}"
            "\n",
            backend.c_str(), static_cast<unsigned long long>(regions), static_cast<unsigned long long>(moved),
            reps, cpu[cpu.size() / 2], cpu[cpu.size() * 9 / 10], cpu.front());
    }
    a->close();
    b->close();
    return 0;
}
