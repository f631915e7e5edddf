// memcpy against util/fast_copy.h's streaming copy for a KV-like scattered copy: a
// contiguous source of `total` bytes into `run`-byte slots picked at random in a cold
// pool 1.25x larger (the free blocks of a fragmented paged KV pool). Each case repeats
// until about 400 MiB have moved, best of 3; the destinations change between repeats.
// The measurement behind kStreamingCopyMin (util/fast_copy.h).
//
//   build/cpp/tests/cpp/kvxfer_scattered_copy
// Prints one JSON line per (total, run): GB/s of memcpy and of the streaming copy.
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "util/fast_copy.h"

int main() {
    using Clock = std::chrono::steady_clock;
    const size_t totals[] = {64 << 10, 256 << 10, 768 << 10, 4 << 20, 32 << 20, 377 << 20};
    const size_t runs[] = {768, 1536, 3072, 6144, 12288, 32768};
    const size_t max_total = 377 << 20;
    const size_t pool = max_total + max_total / 4;
    auto* src = static_cast<uint8_t*>(
        mmap(nullptr, max_total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    auto* dst = static_cast<uint8_t*>(
        mmap(nullptr, pool, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (src == MAP_FAILED || dst == MAP_FAILED) {
        std::perror("mmap");
        return 1;
    }
    std::memset(src, 1, max_total);
    std::memset(dst, 2, pool);
    std::mt19937 rng(1);
    for (const size_t total : totals) {
        for (const size_t run : runs) {
            const size_t n = total / run;
            const size_t slots = pool / run;
            std::vector<size_t> slot(slots);
            std::iota(slot.begin(), slot.end(), size_t{0});
            std::shuffle(slot.begin(), slot.end(), rng);
            const size_t reps = std::max<size_t>(1, (size_t{400} << 20) / total);
            double best[2] = {1e30, 1e30};
            for (int trial = 0; trial < 3; ++trial) {
                for (int mode = 0; mode < 2; ++mode) {
                    const auto t0 = Clock::now();
                    for (size_t r = 0; r < reps; ++r) {
                        const size_t first = (r * 7919) % (slots - n + 1);
                        for (size_t i = 0; i < n; ++i) {
                            uint8_t* d = dst + slot[(first + i) % slots] * run;
                            const uint8_t* s = src + i * run;
                            if (mode == 1) {
                                kvxfer::streamCopy(d, s, run);
                            } else {
                                std::memcpy(d, s, run);
                            }
                        }
                        kvxfer::copyFence();
                    }
                    best[mode] =
                        std::min(best[mode], std::chrono::duration<double>(Clock::now() - t0).count());
                }
            }
            const double gb = double(total) * double(reps) / 1e9;
            std::printf("{\"total_bytes\":%zu,\"run_bytes\":%zu,\"memcpy_gbps\":%.2f,\"stream_gbps\":%.2f}\n",
                        total, run, gb / best[0], gb / best[1]);
            std::fflush(stdout);
        }
    }
    return 0;
}
