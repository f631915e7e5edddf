// KV layouts, transfer sides and the coalescing planner.
//
// Everything here is pure: no I/O, no backend calls, no global state. The planner turns
// "these block ids / extents here -> those there" into a Plan: a list of byte runs, each
// contiguous on both sides, repeated over a list of planes (one plane per layer and K/V
// when blocks of different layers are not adjacent). Backends walk planes x runs.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "kvxfer/status.h"

namespace kvxfer {

// Geometry of a paged KV cache inside one registered region. A piece (layer l, kv k,
// block b) of `block_bytes` starts at
//     offset + l * layer_stride + k * kv_stride + b * block_stride.
// Zero strides take the dense layer-major default [layer][kv][block][block_bytes]; a
// "cross-layer" pool (vLLM's one-block-spans-all-layers) sets block_stride largest.
struct KvLayout {
    uint32_t num_layers = 1;
    uint32_t num_kv = 1;  // 1 (fused / MLA) or 2 (separate K and V)
    uint64_t num_blocks = 0;
    uint64_t block_bytes = 0;
    uint64_t block_stride = 0;
    uint64_t kv_stride = 0;
    uint64_t layer_stride = 0;
    uint64_t offset = 0;

    // Fills zero strides with the dense defaults.
    KvLayout normalized() const;
    // Checks the normalized layout fits in `region_bytes` without overflow.
    Status validate(uint64_t region_bytes) const;
    uint64_t pieceOffset(uint64_t layer, uint64_t kv, uint64_t block) const {
        return offset + layer * layer_stride + kv * kv_stride + block * block_stride;
    }
    bool operator==(const KvLayout&) const = default;
};

// One side of a transfer: block ids in a KV layout (optionally a layer sub-range), or
// explicit byte extents. Spans are borrowed for the duration of planning only.
struct BlockSide {
    KvLayout layout;  // normalized
    std::span<const int64_t> block_ids;
    uint32_t layer_begin = 0;
    uint32_t layer_end = 0;  // exclusive; 0 = all layers
};
// Layout-compatible with a C-contiguous (N, 2) uint64 array of [offset, length] rows.
struct Extent {
    uint64_t offset;
    uint64_t length;
};
struct ExtentSide {
    std::span<const Extent> extents;
};
using TransferSide = std::variant<BlockSide, ExtentSide>;

// A byte run, contiguous on both sides, relative to its plane's bases.
struct Run {
    uint64_t local_offset;
    uint64_t remote_offset;
    uint64_t length;
    bool operator==(const Run&) const = default;
};
struct Plane {
    uint64_t local_base;
    uint64_t remote_base;
    bool operator==(const Plane&) const = default;
};

struct Plan {
    std::vector<Run> runs;
    std::vector<Plane> planes;  // never empty; {0,0} when runs are absolute
    uint64_t total_bytes = 0;
    uint64_t num_pieces = 0;  // blocks x layers x K/V (or extents) before coalescing

    uint64_t numRuns() const { return static_cast<uint64_t>(runs.size()) * planes.size(); }
    double coalescingRatio() const {
        return numRuns() ? static_cast<double>(num_pieces) / static_cast<double>(numRuns()) : 1.0;
    }
    // The i-th run of the flattened planes x runs sequence, with bases applied.
    Run flatRun(uint64_t i) const {
        const Plane& p = planes[i / runs.size()];
        const Run& r = runs[i % runs.size()];
        return {p.local_base + r.local_offset, p.remote_base + r.remote_offset, r.length};
    }
};

struct PlanOptions {
    bool coalesce = true;
    uint64_t max_run_bytes = 0;  // 0 = no limit; longer runs are split
};

// Merges each run into its predecessor when it continues it on both sides. Keeps order,
// conserves bytes. Pure; used by makePlan and tested alone.
void coalesceRuns(std::vector<Run>& runs);
// Splits runs longer than max_run_bytes (> 0) into pieces of at most that size.
void splitRuns(std::vector<Run>& runs, uint64_t max_run_bytes);

// Validates both sides against their regions (block ids in range, extents inside the
// region, equal byte totals) before anything moves, then builds the plan. The local byte
// stream (pieces in (layer, kv, list position) order for blocks, list order for extents)
// is copied onto the remote byte stream in the same order.
Result<Plan> makePlan(const TransferSide& local, uint64_t local_region_bytes, const TransferSide& remote,
                      uint64_t remote_region_bytes, const PlanOptions& options);

}  // namespace kvxfer
