#include "kvxfer/plan.h"

#include <algorithm>
#include <string>

namespace kvxfer {
namespace {

bool mulOverflow(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }
bool addOverflow(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_add_overflow(a, b, out); }

// Appends a run, merging it into the previous one when it continues it on both sides.
inline void pushRun(std::vector<Run>& runs, uint64_t local, uint64_t remote, uint64_t length, bool coalesce) {
    if (coalesce && !runs.empty()) {
        Run& last = runs.back();
        if (last.local_offset + last.length == local && last.remote_offset + last.length == remote) {
            last.length += length;
            return;
        }
    }
    runs.push_back({local, remote, length});
}

struct SideInfo {
    uint64_t total_bytes = 0;
    uint32_t layer_begin = 0;
    uint32_t layer_count = 0;
};

Status checkSide(const TransferSide& side, uint64_t region_bytes, const char* which, SideInfo* info) {
    if (const auto* b = std::get_if<BlockSide>(&side)) {
        const KvLayout& l = b->layout;
        KVXFER_RETURN_IF_ERROR(l.validate(region_bytes));
        const uint32_t end = b->layer_end == 0 ? l.num_layers : b->layer_end;
        if (b->layer_begin >= end || end > l.num_layers) {
            return Status::outOfRange(std::string(which) + " layer range [" + std::to_string(b->layer_begin) +
                                      ", " + std::to_string(end) + ") is not inside [0, " +
                                      std::to_string(l.num_layers) + ")");
        }
        // One branch-light pass; the error path re-scans to name the first offender.
        const uint64_t nb = l.num_blocks;
        bool bad = false;
        for (int64_t id : b->block_ids) bad |= static_cast<uint64_t>(id) >= nb;
        if (bad) {
            for (size_t i = 0; i < b->block_ids.size(); ++i) {
                if (static_cast<uint64_t>(b->block_ids[i]) >= nb) {
                    return Status::outOfRange(
                        std::string(which) + " block id " + std::to_string(b->block_ids[i]) +
                        " at position " + std::to_string(i) + " is outside [0, " + std::to_string(nb) + ")");
                }
            }
        }
        uint64_t per_block = 0, total = 0;
        if (mulOverflow(static_cast<uint64_t>(end - b->layer_begin) * l.num_kv, l.block_bytes, &per_block) ||
            mulOverflow(per_block, b->block_ids.size(), &total)) {
            return Status::invalidArgument(std::string(which) + " transfer size overflows 64 bits");
        }
        *info = {total, b->layer_begin, end - b->layer_begin};
        return Status::ok();
    }
    const auto& e = std::get<ExtentSide>(side).extents;
    uint64_t total = 0;
    for (size_t i = 0; i < e.size(); ++i) {
        uint64_t end = 0;
        if (e[i].length == 0) {
            return Status::invalidArgument(std::string(which) + " extent " + std::to_string(i) +
                                           " has zero length");
        }
        if (addOverflow(e[i].offset, e[i].length, &end) || end > region_bytes) {
            return Status::outOfRange(std::string(which) + " extent " + std::to_string(i) + " [" +
                                      std::to_string(e[i].offset) + ", +" + std::to_string(e[i].length) +
                                      ") is outside the region of " + std::to_string(region_bytes) +
                                      " bytes");
        }
        if (addOverflow(total, e[i].length, &total)) {
            return Status::invalidArgument(std::string(which) + " transfer size overflows 64 bits");
        }
    }
    *info = {total, 0, 0};
    return Status::ok();
}

// Yields the byte pieces of one side in stream order: (layer, kv, list position) for
// blocks, list order for extents.
class PieceCursor {
public:
    PieceCursor(const TransferSide& side, const SideInfo& info) : side_(side), info_(info) {
        if (const auto* b = std::get_if<BlockSide>(&side_)) {
            blocks_ = b;
            num_kv_ = b->layout.num_kv;
        }
    }
    bool next(uint64_t* offset, uint64_t* length) {
        if (blocks_ == nullptr) {
            const auto& e = std::get<ExtentSide>(side_).extents;
            if (index_ >= e.size()) return false;
            *offset = e[index_].offset;
            *length = e[index_].length;
            ++index_;
            return true;
        }
        const auto& ids = blocks_->block_ids;
        if (ids.empty()) return false;
        if (index_ == ids.size()) {
            index_ = 0;
            if (++kv_ == num_kv_) {
                kv_ = 0;
                ++layer_;
            }
        }
        if (layer_ >= info_.layer_count) return false;
        *offset =
            blocks_->layout.pieceOffset(info_.layer_begin + layer_, kv_, static_cast<uint64_t>(ids[index_]));
        *length = blocks_->layout.block_bytes;
        ++index_;
        return true;
    }

private:
    const TransferSide& side_;
    SideInfo info_;
    const BlockSide* blocks_ = nullptr;
    size_t index_ = 0;
    uint32_t kv_ = 0, num_kv_ = 1, layer_ = 0;
};

// Any pair of sides: walk both byte streams, cutting at every piece boundary.
void planGeneral(const TransferSide& local, const SideInfo& li, const TransferSide& remote,
                 const SideInfo& ri, bool coalesce, Plan* plan) {
    PieceCursor lc(local, li), rc(remote, ri);
    uint64_t lo = 0, ll = 0, ro = 0, rl = 0;
    for (;;) {
        if (ll == 0 && !lc.next(&lo, &ll)) break;
        if (rl == 0 && !rc.next(&ro, &rl)) break;
        const uint64_t n = std::min(ll, rl);
        pushRun(plan->runs, lo, ro, n, coalesce);
        ++plan->num_pieces;
        lo += n, ll -= n, ro += n, rl -= n;
    }
    plan->planes = {{0, 0}};
}

bool denseWithinBlock(const KvLayout& l, uint32_t layer_count) {
    return (l.num_kv == 1 || l.kv_stride == l.block_bytes) &&
           (layer_count == 1 || l.layer_stride == l.num_kv * l.block_bytes);
}

// Blocks on both sides with the same piece geometry: pair by (layer, kv, position).
void planBlocks(const BlockSide& l, const SideInfo& li, const BlockSide& r, const SideInfo& ri, bool coalesce,
                Plan* plan) {
    const uint64_t n = l.block_ids.size();
    const uint64_t pieces_per_block = static_cast<uint64_t>(li.layer_count) * l.layout.num_kv;
    plan->num_pieces = n * pieces_per_block;
    const uint64_t lbs = l.layout.block_stride, rbs = r.layout.block_stride;
    if (pieces_per_block > 1 && denseWithinBlock(l.layout, li.layer_count) &&
        denseWithinBlock(r.layout, ri.layer_count) && coalesce) {
        // Cross-layer pools: all (layer, kv) pieces of a block form one element.
        const uint64_t element = pieces_per_block * l.layout.block_bytes;
        const uint64_t lbase = l.layout.pieceOffset(li.layer_begin, 0, 0);
        const uint64_t rbase = r.layout.pieceOffset(ri.layer_begin, 0, 0);
        plan->runs.reserve(n);
        for (uint64_t i = 0; i < n; ++i) {
            pushRun(plan->runs, lbase + static_cast<uint64_t>(l.block_ids[i]) * lbs,
                    rbase + static_cast<uint64_t>(r.block_ids[i]) * rbs, element, true);
        }
        plan->planes = {{0, 0}};
        return;
    }
    // Per-layer planes: the id pattern is coalesced once and repeated over every plane.
    const uint64_t bb = l.layout.block_bytes;
    // Upper bound: pages of the reservation that coalescing leaves unused are never touched.
    plan->runs.reserve(n);
    for (uint64_t i = 0; i < n; ++i) {
        pushRun(plan->runs, static_cast<uint64_t>(l.block_ids[i]) * lbs,
                static_cast<uint64_t>(r.block_ids[i]) * rbs, bb, coalesce);
    }
    plan->planes.clear();
    plan->planes.reserve(pieces_per_block);
    for (uint32_t layer = 0; layer < li.layer_count; ++layer) {
        for (uint32_t kv = 0; kv < l.layout.num_kv; ++kv) {
            plan->planes.push_back({l.layout.pieceOffset(li.layer_begin + layer, kv, 0),
                                    r.layout.pieceOffset(ri.layer_begin + layer, kv, 0)});
        }
    }
    // One run per plane: flatten, so planes that touch (a whole pool, K next to V) merge.
    if (coalesce && plan->runs.size() == 1 && plan->planes.size() > 1) {
        std::vector<Run> flat;
        const Run run = plan->runs[0];
        for (const Plane& p : plan->planes) {
            pushRun(flat, p.local_base + run.local_offset, p.remote_base + run.remote_offset, run.length,
                    true);
        }
        plan->runs = std::move(flat);
        plan->planes = {{0, 0}};
    }
}

}  // namespace

KvLayout KvLayout::normalized() const {
    KvLayout l = *this;
    if (l.block_stride == 0) l.block_stride = l.block_bytes;
    if (l.kv_stride == 0) l.kv_stride = l.block_stride * l.num_blocks;
    if (l.layer_stride == 0) l.layer_stride = l.kv_stride * l.num_kv;
    return l;
}

Status KvLayout::validate(uint64_t region_bytes) const {
    if (num_layers == 0 || num_blocks == 0 || block_bytes == 0) {
        return Status::invalidArgument("KV layout needs num_layers, num_blocks and block_bytes > 0");
    }
    if (num_kv != 1 && num_kv != 2) {
        return Status::invalidArgument("KV layout num_kv must be 1 or 2, got " + std::to_string(num_kv));
    }
    if (num_blocks > 1 && block_stride < block_bytes) {
        return Status::invalidArgument("KV layout block_stride " + std::to_string(block_stride) +
                                       " is smaller than block_bytes " + std::to_string(block_bytes) +
                                       ": blocks would overlap");
    }
    uint64_t a = 0, b = 0, c = 0, end = 0;
    if (mulOverflow(num_layers - 1, layer_stride, &a) || mulOverflow(num_kv - 1, kv_stride, &b) ||
        mulOverflow(num_blocks - 1, block_stride, &c) || addOverflow(offset, a, &end) ||
        addOverflow(end, b, &end) || addOverflow(end, c, &end) || addOverflow(end, block_bytes, &end)) {
        return Status::invalidArgument("KV layout extent overflows 64 bits");
    }
    if (end > region_bytes) {
        return Status::outOfRange("KV layout spans " + std::to_string(end) + " bytes but the region has " +
                                  std::to_string(region_bytes));
    }
    return Status::ok();
}

void coalesceRuns(std::vector<Run>& runs) {
    if (runs.empty()) return;
    size_t out = 0;
    for (size_t i = 1; i < runs.size(); ++i) {
        Run& last = runs[out];
        const Run& r = runs[i];
        if (last.local_offset + last.length == r.local_offset &&
            last.remote_offset + last.length == r.remote_offset) {
            last.length += r.length;
        } else {
            runs[++out] = r;
        }
    }
    runs.resize(out + 1);
}

void splitRuns(std::vector<Run>& runs, uint64_t max_run_bytes) {
    if (max_run_bytes == 0) return;
    size_t extra = 0;
    for (const Run& r : runs) extra += (r.length - 1) / max_run_bytes;
    if (extra == 0) return;
    std::vector<Run> out;
    out.reserve(runs.size() + extra);
    for (const Run& r : runs) {
        for (uint64_t done = 0; done < r.length; done += max_run_bytes) {
            out.push_back(
                {r.local_offset + done, r.remote_offset + done, std::min(max_run_bytes, r.length - done)});
        }
    }
    runs = std::move(out);
}

Result<Plan> makePlan(const TransferSide& local, uint64_t local_region_bytes, const TransferSide& remote,
                      uint64_t remote_region_bytes, const PlanOptions& options) {
    SideInfo li, ri;
    KVXFER_RETURN_IF_ERROR(checkSide(local, local_region_bytes, "local", &li));
    KVXFER_RETURN_IF_ERROR(checkSide(remote, remote_region_bytes, "remote", &ri));
    if (li.total_bytes != ri.total_bytes) {
        return Status::invalidArgument("local side has " + std::to_string(li.total_bytes) +
                                       " bytes but remote side has " + std::to_string(ri.total_bytes));
    }
    if (li.total_bytes == 0) return Status::invalidArgument("transfer moves no bytes");

    Plan plan;
    plan.total_bytes = li.total_bytes;
    const auto* lb = std::get_if<BlockSide>(&local);
    const auto* rb = std::get_if<BlockSide>(&remote);
    if (lb && rb && lb->layout.block_bytes == rb->layout.block_bytes &&
        lb->layout.num_kv == rb->layout.num_kv && li.layer_count == ri.layer_count) {
        planBlocks(*lb, li, *rb, ri, options.coalesce, &plan);
    } else {
        planGeneral(local, li, remote, ri, options.coalesce, &plan);
    }
    splitRuns(plan.runs, options.max_run_bytes);
    return plan;
}

}  // namespace kvxfer
