// CPU copy of one planned run, for backends whose bytes are moved by the CPU.
//
// Runs of at least kStreamingCopyMin bytes use non-temporal (streaming) stores: the
// destination of a KV transfer is not read again soon by this core, so writing around
// the cache avoids reading every destination line first and evicting the cache.
// glibc's memcpy switches to such stores only for very large copies (192 MiB on the
// development machine), so runs of 4 KiB to 64 MiB would otherwise take the slow path.
// Measured there (2-core AMD EPYC, runs scattered into a cold pool, as the free blocks
// of a paged KV pool are; bench/cpp/scattered_copy.cc, docs/shm.md): streaming is
// 1.4-3.5x faster than memcpy for every run size from 768 B to 32 KiB and every job
// size from 64 KiB to 377 MiB. The threshold was 32 KiB until then, which left the
// 12 KiB runs of 16-token blocks (one layer and K/V plane of a small model) on the slow
// path. Below 4 KiB the copy stays cached: small messages (the latency path) are often
// read back at once.
//
// Streaming stores are weakly ordered: call copyFence() after a chunk of copies and
// before anything that tells another party the bytes are there.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

namespace kvxfer {

inline constexpr size_t kStreamingCopyMin = 4 * 1024;

// Copies n bytes with non-temporal stores (after a head copied normally up to the
// destination's next 16-byte boundary, and a tail under one 64-byte line).
inline void streamCopy(void* dst, const void* src, size_t n) {
#if defined(__x86_64__)
    auto* d = static_cast<uint8_t*>(dst);
    const auto* s = static_cast<const uint8_t*>(src);
    const size_t head = std::min(n, (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15);
    std::memcpy(d, s, head);
    d += head, s += head, n -= head;
    const size_t lines = n / 64;
    for (size_t i = 0; i < lines; ++i, d += 64, s += 64) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16));
        const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32));
        const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 48));
        _mm_stream_si128(reinterpret_cast<__m128i*>(d), a);
        _mm_stream_si128(reinterpret_cast<__m128i*>(d + 16), b);
        _mm_stream_si128(reinterpret_cast<__m128i*>(d + 32), c);
        _mm_stream_si128(reinterpret_cast<__m128i*>(d + 48), e);
    }
    std::memcpy(d, s, n - lines * 64);
#else
    std::memcpy(dst, src, n);
#endif
}

inline void copyRun(void* dst, const void* src, size_t n) {
    if (n >= kStreamingCopyMin) {
        streamCopy(dst, src, n);
    } else {
        std::memcpy(dst, src, n);
    }
}

// Makes every streaming store of this thread globally visible before later stores.
inline void copyFence() {
#if defined(__x86_64__)
    _mm_sfence();
#endif
}

}  // namespace kvxfer
