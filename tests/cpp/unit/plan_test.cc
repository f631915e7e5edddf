// Coalescer and planner invariants: bytes conserved, runs stay inside both regions,
// contiguous pieces merge, non-contiguous ones do not, splits respect the maximum,
// and the plan moves exactly the bytes a naive piece-by-piece copy would.
#include "kvxfer/plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

namespace kvxfer {
namespace {
using PlanRun = ::kvxfer::Run;

uint64_t planBytes(const Plan& p) {
    uint64_t total = 0;
    for (uint64_t i = 0; i < p.numRuns(); ++i) total += p.flatRun(i).length;
    return total;
}

// Applies a plan to byte vectors (the reference semantics of a WRITE).
void apply(const Plan& p, const std::vector<uint8_t>& src, std::vector<uint8_t>& dst) {
    for (uint64_t i = 0; i < p.numRuns(); ++i) {
        const PlanRun r = p.flatRun(i);
        std::copy_n(src.begin() + r.local_offset, r.length, dst.begin() + r.remote_offset);
    }
}

KvLayout dense(uint32_t layers, uint32_t kv, uint64_t blocks, uint64_t bytes) {
    KvLayout l;
    l.num_layers = layers;
    l.num_kv = kv;
    l.num_blocks = blocks;
    l.block_bytes = bytes;
    return l.normalized();
}

uint64_t layoutBytes(const KvLayout& l) { return l.num_layers * l.layer_stride; }

TEST(CoalesceRuns, MergesOnlyWhenContiguousOnBothSides) {
    std::vector<PlanRun> runs = {{0, 100, 10}, {10, 110, 5}, {15, 200, 5}, {20, 205, 5}, {100, 210, 1}};
    coalesceRuns(runs);
    ASSERT_EQ(runs.size(), 3u);
    EXPECT_EQ(runs[0], (PlanRun{0, 100, 15}));
    EXPECT_EQ(runs[1], (PlanRun{15, 200, 10}));
    EXPECT_EQ(runs[2], (PlanRun{100, 210, 1}));
}

TEST(CoalesceRuns, EmptyAndSingle) {
    std::vector<PlanRun> none;
    coalesceRuns(none);
    EXPECT_TRUE(none.empty());
    std::vector<PlanRun> one = {{5, 6, 7}};
    coalesceRuns(one);
    EXPECT_EQ(one, (std::vector<PlanRun>{{5, 6, 7}}));
}

TEST(SplitRuns, RespectsMaximumAndConservesBytes) {
    std::vector<PlanRun> runs = {{0, 1000, 10}, {50, 2000, 3}};
    splitRuns(runs, 4);
    std::vector<PlanRun> want = {{0, 1000, 4}, {4, 1004, 4}, {8, 1008, 2}, {50, 2000, 3}};
    EXPECT_EQ(runs, want);
}

TEST(Plan, ConsecutiveBlocksOfWholePoolBecomeOneRun) {
    const KvLayout l = dense(4, 2, 16, 64);
    std::vector<int64_t> ids(16);
    std::iota(ids.begin(), ids.end(), 0);
    auto plan = makePlan(BlockSide{l, ids}, layoutBytes(l), BlockSide{l, ids}, layoutBytes(l), {});
    ASSERT_TRUE(plan.isOk()) << plan.status().toString();
    EXPECT_EQ(plan->numRuns(), 1u);  // all layers, K and V adjacent on both sides
    EXPECT_EQ(plan->num_pieces, 4u * 2 * 16);
    EXPECT_EQ(plan->total_bytes, layoutBytes(l));
}

TEST(Plan, CoalescingOffGivesOneRunPerPiece) {
    const KvLayout l = dense(3, 2, 8, 32);
    std::vector<int64_t> ids = {1, 2, 3, 7};
    PlanOptions off;
    off.coalesce = false;
    auto plan = makePlan(BlockSide{l, ids}, layoutBytes(l), BlockSide{l, ids}, layoutBytes(l), off);
    ASSERT_TRUE(plan.isOk());
    EXPECT_EQ(plan->numRuns(), 3u * 2 * 4);
    EXPECT_DOUBLE_EQ(plan->coalescingRatio(), 1.0);
    auto on = makePlan(BlockSide{l, ids}, layoutBytes(l), BlockSide{l, ids}, layoutBytes(l), {});
    ASSERT_TRUE(on.isOk());
    EXPECT_EQ(on->numRuns(), 3u * 2 * 2);  // {1,2,3} and {7} per plane
}

TEST(Plan, CrossLayerLayoutMergesWholeBlocks) {
    // vLLM-style cross-layer pool: a block holds every layer's K and V contiguously.
    KvLayout l;
    l.num_layers = 4;
    l.num_kv = 2;
    l.num_blocks = 10;
    l.block_bytes = 16;
    l.kv_stride = 16;
    l.layer_stride = 32;
    l.block_stride = 128;
    l = l.normalized();
    std::vector<int64_t> ids = {3, 4, 9};
    auto plan = makePlan(BlockSide{l, ids}, 1280, BlockSide{l, ids}, 1280, {});
    ASSERT_TRUE(plan.isOk());
    EXPECT_EQ(plan->numRuns(), 2u);  // blocks 3-4 merged, 9 alone
    EXPECT_EQ(plan->runs[0], (PlanRun{3 * 128, 3 * 128, 256}));
}

TEST(Plan, RejectsOutOfRangeIdsAndLayers) {
    const KvLayout l = dense(2, 2, 8, 32);
    std::vector<int64_t> bad = {0, 8};
    auto p = makePlan(BlockSide{l, bad}, layoutBytes(l), BlockSide{l, std::vector<int64_t>{0, 1}},
                      layoutBytes(l), {});
    EXPECT_EQ(p.status().code(), StatusCode::kOutOfRange);
    std::vector<int64_t> negative = {-1};
    p = makePlan(BlockSide{l, negative}, layoutBytes(l), BlockSide{l, negative}, layoutBytes(l), {});
    EXPECT_EQ(p.status().code(), StatusCode::kOutOfRange);
    std::vector<int64_t> ok = {1};
    p = makePlan(BlockSide{l, ok, 1, 3}, layoutBytes(l), BlockSide{l, ok, 1, 3}, layoutBytes(l), {});
    EXPECT_EQ(p.status().code(), StatusCode::kOutOfRange);
}

TEST(Plan, RejectsExtentsOutsideRegionAndMismatchedTotals) {
    std::vector<Extent> e = {{90, 20}};
    auto p = makePlan(ExtentSide{e}, 100, ExtentSide{e}, 1000, {});
    EXPECT_EQ(p.status().code(), StatusCode::kOutOfRange);
    std::vector<Extent> a = {{0, 10}}, b = {{0, 11}};
    p = makePlan(ExtentSide{a}, 100, ExtentSide{b}, 100, {});
    EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
    std::vector<Extent> wrap = {{~0ull - 4, 10}};
    p = makePlan(ExtentSide{wrap}, ~0ull, ExtentSide{a}, 100, {});
    EXPECT_EQ(p.status().code(), StatusCode::kOutOfRange);
    std::vector<Extent> zero = {{0, 0}};
    p = makePlan(ExtentSide{zero}, 100, ExtentSide{zero}, 100, {});
    EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
}

TEST(Plan, LayoutValidation) {
    KvLayout l = dense(2, 2, 8, 32);
    EXPECT_TRUE(l.validate(layoutBytes(l)).isOk());
    EXPECT_EQ(l.validate(layoutBytes(l) - 1).code(), StatusCode::kOutOfRange);
    KvLayout overlap = l;
    overlap.block_stride = 16;
    EXPECT_EQ(overlap.validate(1 << 20).code(), StatusCode::kInvalidArgument);
    KvLayout huge = dense(1, 1, 2, 1);
    huge.block_stride = ~0ull;
    EXPECT_EQ(huge.validate(~0ull).code(), StatusCode::kInvalidArgument);
    KvLayout three = dense(1, 3, 2, 4);
    EXPECT_EQ(three.validate(1 << 20).code(), StatusCode::kInvalidArgument);
}

// Block-free transfer (P/D-Serve): one contiguous local range scattered into paged blocks.
TEST(Plan, ContiguousRangeScattersIntoBlocksInStreamOrder) {
    const KvLayout l = dense(2, 2, 8, 16);
    std::vector<int64_t> ids = {5, 1};
    std::vector<Extent> range = {{0, 2 * 2 * 2 * 16}};
    auto plan = makePlan(ExtentSide{range}, 128, BlockSide{l, ids}, layoutBytes(l), {});
    ASSERT_TRUE(plan.isOk());
    std::vector<uint8_t> src(128), dst(layoutBytes(l), 0);
    std::iota(src.begin(), src.end(), 1);
    apply(*plan, src, dst);
    // Stream order: layer 0 K [5,1], layer 0 V [5,1], layer 1 K [5,1], layer 1 V [5,1].
    uint64_t pos = 0;
    for (uint32_t layer = 0; layer < 2; ++layer)
        for (uint32_t kv = 0; kv < 2; ++kv)
            for (int64_t id : ids) {
                const uint64_t off = l.pieceOffset(layer, kv, id);
                EXPECT_TRUE(std::equal(src.begin() + pos, src.begin() + pos + 16, dst.begin() + off));
                pos += 16;
            }
}

// Randomised: the coalesced and the uncoalesced plan move identical bytes, conserve the
// total, and never leave either region.
TEST(Plan, RandomisedEquivalenceAndBounds) {
    std::mt19937_64 rng(1234);
    for (int iter = 0; iter < 300; ++iter) {
        const uint32_t layers = 1 + rng() % 4, kv = 1 + rng() % 2;
        const uint64_t blocks = 1 + rng() % 40, bytes = 1 + rng() % 48;
        KvLayout lay = dense(layers, kv, blocks, bytes);
        KvLayout ray = dense(layers, kv, blocks + rng() % 5, bytes);
        const size_t n = 1 + rng() % (2 * blocks);
        std::vector<int64_t> lid(n), rid(n);
        for (size_t i = 0; i < n; ++i) {
            lid[i] =
                (rng() % 3 == 0) ? static_cast<int64_t>(rng() % blocks) : static_cast<int64_t>(i % blocks);
            rid[i] = static_cast<int64_t>(rng() % ray.num_blocks);
        }
        const uint64_t lbytes = layoutBytes(lay), rbytes = layoutBytes(ray);
        PlanOptions on, off;
        off.coalesce = false;
        on.max_run_bytes = 1 + rng() % 200;
        auto a = makePlan(BlockSide{lay, lid}, lbytes, BlockSide{ray, rid}, rbytes, on);
        auto b = makePlan(BlockSide{lay, lid}, lbytes, BlockSide{ray, rid}, rbytes, off);
        ASSERT_TRUE(a.isOk() && b.isOk());
        EXPECT_EQ(planBytes(*a), n * layers * kv * bytes);
        EXPECT_EQ(planBytes(*b), planBytes(*a));
        auto c = makePlan(BlockSide{lay, lid}, lbytes, BlockSide{ray, rid}, rbytes, {});
        ASSERT_TRUE(c.isOk());
        EXPECT_LE(c->numRuns(), b->numRuns());  // coalescing never adds runs (splitting may)
        EXPECT_EQ(planBytes(*c), planBytes(*b));
        for (uint64_t i = 0; i < a->numRuns(); ++i) {
            const PlanRun r = a->flatRun(i);
            EXPECT_LE(r.length, on.max_run_bytes);
            EXPECT_LE(r.local_offset + r.length, lbytes);
            EXPECT_LE(r.remote_offset + r.length, rbytes);
        }
        // Duplicate remote ids make the result order-dependent; compare only when unique.
        std::vector<int64_t> sorted = rid;
        std::sort(sorted.begin(), sorted.end());
        if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) continue;
        std::vector<uint8_t> src(lbytes);
        for (auto& c : src) c = static_cast<uint8_t>(rng());
        std::vector<uint8_t> da(rbytes, 0), db(rbytes, 0);
        apply(*a, src, da);
        apply(*b, src, db);
        EXPECT_EQ(da, db);
    }
}

}  // namespace
}  // namespace kvxfer
