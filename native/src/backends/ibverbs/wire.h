// wire: the bytes this backend exchanges — endpoint info (published in the descriptor),
// connection-manager datagrams (UD SENDs) and notification messages (RC SENDs).
// README.md in this directory documents every field; all integers are little-endian.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "backends/ibverbs/device.h"
#include "kvxfer/descriptor.h"
#include "util/auth.h"

namespace kvxfer::ib {

// ---- endpoint info: what a peer needs to reach our connection manager ----------------
struct EndpointInfo {
    static constexpr uint32_t kMagic = 0x4249564b;  // "KVIB"
    static constexpr uint8_t kVersion = 1;
    static constexpr size_t kBytes = 40;
    uint8_t link_layer = IBV_LINK_LAYER_ETHERNET;
    uint8_t mtu = IBV_MTU_1024;  // enum ibv_mtu of the port's active MTU
    uint8_t port = 1;
    ibv_gid gid{};
    uint16_t lid = 0;
    uint32_t ud_qpn = 0;
    uint32_t qkey = 0;
};
Bytes encodeEndpointInfo(const EndpointInfo& info);
Result<EndpointInfo> decodeEndpointInfo(ByteView bytes);

// ---- connection-manager datagrams ------------------------------------------------------
enum class CmType : uint8_t {
    kConnectRequest = 1,
    kConnectReply = 2,
    kReject = 3,
    kDisconnect = 4,
    kChallenge = 5,
};
enum class RejectReason : uint32_t {
    kMalformed = 1,      // could not parse the request
    kWrongInstance = 2,  // dst_instance is not ours (the descriptor is stale)
    kResources = 3,      // could not create or connect QPs
    kIncompatible = 4,   // version / link layer / QP count mismatch
    kShuttingDown = 5,
    kUnauthenticated = 6,  // the request's proof of the descriptor's secret was wrong
};

struct QpEndpoint {
    uint32_t qpn = 0;
    uint32_t psn = 0;
};

struct CmMessage {
    static constexpr uint32_t kMagic = 0x4d43564b;  // "KVCM"
    static constexpr uint8_t kVersion = 2;          // 2: authenticated (README.md, "Authentication")
    static constexpr size_t kHeaderBytes = 32;
    static constexpr size_t kAuthBytes = 2 * auth::kNonceBytes + auth::kMacBytes;  // trailer
    static constexpr size_t kMaxQps = 16;
    static constexpr size_t kMaxName = 256;
    static constexpr size_t kMaxBytes = 1024;  // fits the smallest RoCE path MTU

    CmType type = CmType::kConnectRequest;
    uint64_t conn_id = 0;
    uint64_t src_instance = 0;
    uint64_t dst_instance = 0;
    // CONNECT_REQ / CONNECT_REP
    ibv_gid gid{};
    uint32_t ud_qpn = 0;
    uint32_t qkey = 0;
    uint16_t lid = 0;
    uint8_t mtu = 0;
    uint8_t rd_atomic = 0;
    uint32_t generation = 0;
    std::vector<QpEndpoint> qps;
    std::string name;
    // REJECT
    RejectReason reason = RejectReason::kMalformed;
    std::string text;
    // Authentication (CONNECT_REQ, CONNECT_REP, DISCONNECT: the trailer; CHALLENGE: the
    // nonces only): the initiator's nonce, the target's nonce (zero in a first request),
    // and the MAC over every byte of the message before it (zero when not yet proven).
    auth::Nonce initiator_nonce{};
    auth::Nonce target_nonce{};
    auth::Mac mac{};
    Bytes signed_bytes;  // decodeCm: the bytes `mac` covers
};
// The message's bytes; with a `secret`, `mac` is computed over them (HMAC-SHA256(secret,
// label || bytes before the MAC)) instead of taken from `msg`.
Bytes encodeCm(const CmMessage& msg, ByteView secret = {}, std::string_view label = {});
// nullopt when the datagram is not a well-formed CM message (it is then ignored).
std::optional<CmMessage> decodeCm(ByteView bytes);
// True when `msg.mac` proves `secret` for `label` (constant-time comparison).
bool verifyCm(const CmMessage& msg, ByteView secret, std::string_view label);
bool hasAuthTrailer(CmType type);

// ---- notification message: RC SEND from the initiator, received into the SRQ ----------
struct NotifyHeader {
    static constexpr uint32_t kMagic = 0x544e564b;  // "KVNT"
    static constexpr size_t kBytes = 8;             // u32 magic | u32 payload length
};
constexpr size_t kMaxNotifyPayload = 64 * 1024;
constexpr size_t kNotifyBufferBytes = NotifyHeader::kBytes + kMaxNotifyPayload;
void writeNotifyHeader(uint8_t* out, uint32_t payload_length);
// The payload of a received notification, or nullopt if malformed.
std::optional<ByteView> parseNotify(ByteView message);

}  // namespace kvxfer::ib
