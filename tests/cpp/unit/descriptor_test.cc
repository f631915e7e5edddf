// Descriptor codec: round trip, constant size in the number of blocks, and every kind
// of damage rejected with kBadDescriptor (never a crash, never a partial result).
#include "kvxfer/descriptor.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>

namespace kvxfer {
namespace {

PeerDescriptor sample(uint64_t blocks = 2048) {
    PeerDescriptor d;
    d.engine_name = "prefill-0";
    d.instance_id = 0x1234567890abcdefull;
    d.host_id = "boot/ns";
    d.pid = 4242;
    d.backends = {{"shm", {1, 2, 3}}, {"ibverbs", {9, 9}}};
    RegionDescriptor r;
    r.id = 7;
    r.base_address = 0x7f0000000000ull;
    KvLayout l;
    l.num_layers = 32;
    l.num_kv = 2;
    l.num_blocks = blocks;
    l.block_bytes = 32768;
    l = l.normalized();
    r.length = l.num_layers * l.layer_stride;
    r.layout = l;
    r.remote_keys = {{}, {0xaa, 0xbb, 0xcc, 0xdd}};
    d.regions.push_back(r);
    RegionDescriptor plain;
    plain.id = 8;
    plain.base_address = 4096;
    plain.length = 100;
    plain.remote_keys = {{}, {}};
    d.regions.push_back(plain);
    return d;
}

TEST(Descriptor, RoundTrip) {
    const PeerDescriptor d = sample();
    auto decoded = decodeDescriptor(encodeDescriptor(d));
    ASSERT_TRUE(decoded.isOk()) << decoded.status().toString();
    EXPECT_EQ(*decoded, d);
}

TEST(Descriptor, SizeDoesNotGrowWithBlocks) {
    EXPECT_EQ(encodeDescriptor(sample(16)).size(), encodeDescriptor(sample(1 << 20)).size());
    EXPECT_LT(encodeDescriptor(sample()).size(), 512u);
}

TEST(Descriptor, EveryTruncationIsRejected) {
    const Bytes good = encodeDescriptor(sample());
    for (size_t n = 0; n < good.size(); ++n) {
        auto r = decodeDescriptor(ByteView(good.data(), n));
        ASSERT_FALSE(r.isOk()) << "prefix of " << n << " bytes accepted";
        EXPECT_EQ(r.status().code(), StatusCode::kBadDescriptor);
    }
}

TEST(Descriptor, EverySingleBitFlipIsRejected) {
    const Bytes good = encodeDescriptor(sample());
    for (size_t i = 0; i < good.size(); ++i) {
        for (int bit = 0; bit < 8; ++bit) {
            Bytes bad = good;
            bad[i] ^= static_cast<uint8_t>(1u << bit);
            auto r = decodeDescriptor(bad);
            ASSERT_FALSE(r.isOk()) << "flip at byte " << i << " bit " << bit << " accepted";
            EXPECT_EQ(r.status().code(), StatusCode::kBadDescriptor);
        }
    }
}

TEST(Descriptor, TrailingGarbageAndRandomBytesRejected) {
    Bytes good = encodeDescriptor(sample());
    good.push_back(0);
    EXPECT_EQ(decodeDescriptor(good).status().code(), StatusCode::kBadDescriptor);
    std::mt19937 rng(7);
    for (int i = 0; i < 2000; ++i) {
        Bytes junk(rng() % 300);
        for (auto& b : junk) b = static_cast<uint8_t>(rng());
        if (junk.size() >= 4) {  // sometimes with the right magic, to reach deeper checks
            const uint32_t magic = PeerDescriptor::kMagic;
            if (i % 2) std::memcpy(junk.data(), &magic, 4);
        }
        EXPECT_FALSE(decodeDescriptor(junk).isOk());
    }
}

TEST(Descriptor, WrongVersionNamesTheVersion) {
    Bytes good = encodeDescriptor(sample());
    good[4] = 99;
    auto r = decodeDescriptor(good);
    EXPECT_EQ(r.status().code(), StatusCode::kBadDescriptor);
    EXPECT_NE(r.status().message().find("version 99"), std::string::npos);
}

// Semantically inconsistent content with a valid checksum must still be refused.
TEST(Descriptor, InconsistentContentRejectedDespiteValidChecksum) {
    PeerDescriptor dup = sample();
    dup.regions[1].id = dup.regions[0].id;
    EXPECT_EQ(decodeDescriptor(encodeDescriptor(dup)).status().code(), StatusCode::kBadDescriptor);

    PeerDescriptor badlayout = sample();
    badlayout.regions[0].length = 10;  // layout no longer fits
    EXPECT_EQ(decodeDescriptor(encodeDescriptor(badlayout)).status().code(), StatusCode::kBadDescriptor);

    PeerDescriptor noname = sample();
    noname.engine_name.clear();
    EXPECT_EQ(decodeDescriptor(encodeDescriptor(noname)).status().code(), StatusCode::kBadDescriptor);

    PeerDescriptor dupbackend = sample();
    dupbackend.backends[1].name = "shm";
    EXPECT_EQ(decodeDescriptor(encodeDescriptor(dupbackend)).status().code(), StatusCode::kBadDescriptor);
}

}  // namespace
}  // namespace kvxfer
