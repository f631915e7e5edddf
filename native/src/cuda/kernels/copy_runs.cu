// The copy kernel of kvxfer's GPU paths (cuda_ipc transfers, pack, unpack).
//
// One launch copies every entry of a run table. An entry is at most kChunkBytes long
// (longer runs are cut by the host when it builds the table), so the work units are even
// and a grid-stride loop over entries keeps every SM busy. Each CTA copies one entry at a
// time: 16-byte vector loads and stores, four in flight per thread, which is what keeps
// enough requests outstanding across NVLink. Entries whose addresses or length are not
// 16-byte aligned fall back to a byte loop (correct, slow; KV blocks are aligned).
//
// Addresses are `base + offset`: the transfer path passes absolute addresses (bases 0);
// pack/unpack pass the tensors' bases and a table of offsets, and `swap` exchanges the
// source and destination columns (unpack reuses pack's table).
//
// Compile: scripts/gen_cuda_ptx.sh (nvcc -ptx); the PTX is embedded in
// native/src/cuda/copy_kernel_ptx.inc and loaded with cuModuleLoadData.

struct RunEntry {
    unsigned long long src;
    unsigned long long dst;
    unsigned long long len;
};

template <int kUnroll>
__device__ __forceinline__ void copyOne(unsigned long long s, unsigned long long d, unsigned long long n) {
    if (((s | d | n) & 15ull) == 0) {
        const uint4* __restrict__ src = reinterpret_cast<const uint4*>(s);
        uint4* __restrict__ dst = reinterpret_cast<uint4*>(d);
        const unsigned long long n16 = n >> 4;
        const unsigned long long step = blockDim.x;
        unsigned long long i = threadIdx.x;
        for (; i + (kUnroll - 1) * step < n16; i += kUnroll * step) {
            uint4 v[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) v[u] = src[i + u * step];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) dst[i + u * step] = v[u];
        }
        for (; i < n16; i += step) dst[i] = src[i];
    } else {
        const unsigned char* src = reinterpret_cast<const unsigned char*>(s);
        unsigned char* dst = reinterpret_cast<unsigned char*>(d);
        for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    }
}

// A flat table: entry r copies table[r].len bytes from src_base + src to dst_base + dst.
template <int kUnroll>
__device__ __forceinline__ void copyRuns(const RunEntry* __restrict__ table, unsigned long long count,
                                         unsigned long long src_base, unsigned long long dst_base, int swap) {
    for (unsigned long long r = blockIdx.x; r < count; r += gridDim.x) {
        const RunEntry e = table[r];
        copyOne<kUnroll>((swap ? e.dst : e.src) + src_base, (swap ? e.src : e.dst) + dst_base, e.len);
    }
    // Peer stores must be performed before the completion event can tell anyone.
    __threadfence_system();
}

// Runs repeated over planes (a plan's runs x its layers and K/V, or one run list shared
// by every region of a group): work item w copies run w % nruns of plane w / nruns, at
// the plane's (src, dst) bases. The table is nruns + nplanes entries, not their product.
template <int kUnroll>
__device__ __forceinline__ void copyPlanes(const RunEntry* __restrict__ runs, unsigned long long nruns,
                                           const RunEntry* __restrict__ planes, unsigned long long nplanes) {
    const unsigned long long total = nruns * nplanes;
    for (unsigned long long w = blockIdx.x; w < total; w += gridDim.x) {
        const unsigned long long p = w / nruns;
        const RunEntry e = runs[w - p * nruns];
        const RunEntry b = planes[p];
        copyOne<kUnroll>(b.src + e.src, b.dst + e.dst, e.len);
    }
    __threadfence_system();
}

// Variants by loads in flight per thread (16 bytes each); the host picks one
// (KVXFER_CUDA_COPY_UNROLL, default in native/src/cuda/copy.cc).
#define KVXFER_COPY_VARIANT(unroll)                                                                            \
    extern "C" __global__ void __launch_bounds__(1024)                                                          \
        kvxfer_copy_runs_u##unroll(const RunEntry* __restrict__ table, unsigned long long count,                \
                                   unsigned long long src_base, unsigned long long dst_base, int swap) {        \
        copyRuns<unroll>(table, count, src_base, dst_base, swap);                                               \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(1024)                                                          \
        kvxfer_copy_planes_u##unroll(const RunEntry* __restrict__ runs, unsigned long long nruns,               \
                                     const RunEntry* __restrict__ planes, unsigned long long nplanes) {         \
        copyPlanes<unroll>(runs, nruns, planes, nplanes);                                                       \
    }
KVXFER_COPY_VARIANT(2)
KVXFER_COPY_VARIANT(4)
KVXFER_COPY_VARIANT(8)
