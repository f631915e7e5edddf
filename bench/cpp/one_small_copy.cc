// One 4 KiB run at a time, each followed by an sfence (what the shm copy of a single small
// request does): memcpy against util/fast_copy.h's streaming copy, into the same hot
// destination every time (as bench/small_request_rate.py writes block 5 again and again)
// and into destinations that walk a cold 1 GiB pool (a server's requests land in
// different blocks). ns per copy, median (min, max) of 7 rounds of 200000 copies.
// Standalone, not in the CMake build:
//
//   g++ -O2 -std=c++20 -Inative/src -o /tmp/one_small_copy bench/cpp/one_small_copy.cc
//   /tmp/one_small_copy
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include "util/fast_copy.h"

int main() {
    using Clock = std::chrono::steady_clock;
    const size_t n = 4096, pool = size_t(1) << 30, iters = 200000;
    auto* src = static_cast<uint8_t*>(
        mmap(nullptr, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    auto* dst = static_cast<uint8_t*>(
        mmap(nullptr, pool, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (src == MAP_FAILED || dst == MAP_FAILED) {
        std::perror("mmap");
        return 1;
    }
    std::memset(src, 1, 1 << 20);
    std::memset(dst, 2, pool);
    for (const bool hot : {true, false}) {
        for (const bool stream : {false, true}) {
            std::vector<double> rounds;
            size_t off = 0;
            for (int round = 0; round < 7; ++round) {
                const auto t0 = Clock::now();
                for (size_t i = 0; i < iters; ++i) {
                    uint8_t* d = hot ? dst + 5 * n : dst + off;
                    if (!hot) off = (off + 7 * n) % (pool - n);
                    if (stream) {
                        kvxfer::streamCopy(d, src + 5 * n, n);
                    } else {
                        std::memcpy(d, src + 5 * n, n);
                    }
                    kvxfer::copyFence();
                    asm volatile("" ::: "memory");
                }
                rounds.push_back(std::chrono::duration<double, std::nano>(Clock::now() - t0).count() / iters);
            }
            std::sort(rounds.begin(), rounds.end());
            std::printf("{\"dest\": \"%s\", \"copy\": \"%s\", \"ns\": %.1f, \"min\": %.1f, \"max\": %.1f}\n",
                        hot ? "hot" : "cold", stream ? "stream" : "memcpy", rounds[3], rounds[0], rounds[6]);
        }
    }
    return 0;
}
