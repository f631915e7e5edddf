// The ibverbs connection manager's datagrams (native/src/backends/ibverbs/README.md): the
// authentication trailer round-trips, a MAC verifies only under the right secret and role,
// and no single changed byte of a signed message goes unnoticed. No RDMA device needed.
#include <gtest/gtest.h>

#include <string_view>

#include "backends/ibverbs/wire.h"

namespace kvxfer::ib {
namespace {

constexpr std::string_view kInitiator{"kvxfer-ibverbs-initiator\0", 25};
constexpr std::string_view kTarget{"kvxfer-ibverbs-target\0", 22};

Bytes secret(uint8_t fill) { return Bytes(32, fill); }

CmMessage request() {
    CmMessage m;
    m.type = CmType::kConnectRequest;
    m.conn_id = 0x1122334455667788ull;
    m.src_instance = 7;
    m.dst_instance = 9;
    m.ud_qpn = 0x123;
    m.qkey = 0x4b565846;
    m.mtu = 5;
    m.rd_atomic = 4;
    m.generation = 3;
    m.qps = {{0x11, 0x22}, {0x33, 0x44}};
    m.name = "prefill-0";
    m.initiator_nonce.fill(0xA1);
    m.target_nonce.fill(0xB2);
    return m;
}

TEST(IbverbsWire, SignedRequestRoundTripsAndVerifiesOnlyUnderItsSecretAndRole) {
    const Bytes bytes = encodeCm(request(), secret(1), kInitiator);
    ASSERT_LE(bytes.size(), CmMessage::kMaxBytes);
    const auto m = decodeCm(bytes);
    ASSERT_TRUE(m.has_value());
    EXPECT_EQ(m->conn_id, 0x1122334455667788ull);
    EXPECT_EQ(m->generation, 3u);
    ASSERT_EQ(m->qps.size(), 2u);
    EXPECT_EQ(m->qps[1].psn, 0x44u);
    EXPECT_EQ(m->name, "prefill-0");
    EXPECT_EQ(m->initiator_nonce, request().initiator_nonce);
    EXPECT_EQ(m->target_nonce, request().target_nonce);
    EXPECT_TRUE(verifyCm(*m, secret(1), kInitiator));
    EXPECT_FALSE(verifyCm(*m, secret(2), kInitiator));  // another engine's secret
    EXPECT_FALSE(verifyCm(*m, secret(1), kTarget));     // a proof is valid in one role only
    EXPECT_FALSE(verifyCm(*m, Bytes{}, kInitiator));
}

TEST(IbverbsWire, EveryChangedByteOfASignedMessageIsNoticed) {
    const Bytes good = encodeCm(request(), secret(1), kInitiator);
    for (size_t i = 0; i < good.size(); ++i) {
        Bytes bad = good;
        bad[i] ^= 0x01;
        const auto m = decodeCm(bad);
        EXPECT_TRUE(!m.has_value() || !verifyCm(*m, secret(1), kInitiator)) << "byte " << i;
    }
}

TEST(IbverbsWire, UnsignedRequestCarriesZeroMacAndChallengeCarriesBothNonces) {
    CmMessage first = request();
    first.target_nonce = {};
    const auto m = decodeCm(encodeCm(first));
    ASSERT_TRUE(m.has_value());
    EXPECT_EQ(m->mac, auth::Mac{});
    EXPECT_FALSE(verifyCm(*m, secret(1), kInitiator));

    CmMessage ch;
    ch.type = CmType::kChallenge;
    ch.conn_id = 5;
    ch.initiator_nonce.fill(3);
    ch.target_nonce.fill(4);
    const auto c = decodeCm(encodeCm(ch));
    ASSERT_TRUE(c.has_value());
    EXPECT_EQ(c->type, CmType::kChallenge);
    EXPECT_EQ(c->initiator_nonce, ch.initiator_nonce);
    EXPECT_EQ(c->target_nonce, ch.target_nonce);
}

TEST(IbverbsWire, VersionOneAndTruncatedDatagramsAreIgnored) {
    Bytes bytes = encodeCm(request(), secret(1), kInitiator);
    Bytes v1 = bytes;
    v1[4] = 1;  // the unauthenticated connection manager's version
    EXPECT_FALSE(decodeCm(v1).has_value());
    for (size_t n : {size_t{0}, size_t{31}, bytes.size() - 1}) {
        EXPECT_FALSE(decodeCm(ByteView(bytes.data(), n)).has_value()) << n;
    }
}

}  // namespace
}  // namespace kvxfer::ib
