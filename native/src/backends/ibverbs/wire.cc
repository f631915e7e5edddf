#include "backends/ibverbs/wire.h"

#include <algorithm>
#include <cstring>

namespace kvxfer::ib {
namespace {

class Out {
public:
    explicit Out(Bytes& b) : b_(b) {}
    void u8(uint8_t v) { b_.push_back(v); }
    void u16(uint16_t v) { raw(&v, 2); }
    void u32(uint32_t v) { raw(&v, 4); }
    void u64(uint64_t v) { raw(&v, 8); }
    void raw(const void* p, size_t n) {
        const auto* c = static_cast<const uint8_t*>(p);
        b_.insert(b_.end(), c, c + n);
    }

private:
    Bytes& b_;
};

class In {
public:
    explicit In(ByteView b) : b_(b) {}
    bool u8(uint8_t* v) { return raw(v, 1); }
    bool u16(uint16_t* v) { return raw(v, 2); }
    bool u32(uint32_t* v) { return raw(v, 4); }
    bool u64(uint64_t* v) { return raw(v, 8); }
    bool raw(void* p, size_t n) {
        if (n > b_.size() - pos_) return false;
        std::memcpy(p, b_.data() + pos_, n);
        pos_ += n;
        return true;
    }
    bool skip(size_t n) {
        if (n > b_.size() - pos_) return false;
        pos_ += n;
        return true;
    }

private:
    ByteView b_;
    size_t pos_ = 0;
};

}  // namespace

Bytes encodeEndpointInfo(const EndpointInfo& e) {
    Bytes b;
    Out o(b);
    o.u32(EndpointInfo::kMagic);
    o.u8(EndpointInfo::kVersion);
    o.u8(e.link_layer);
    o.u8(e.mtu);
    o.u8(e.port);
    o.raw(e.gid.raw, 16);
    o.u16(e.lid);
    o.u16(0);
    o.u32(e.ud_qpn);
    o.u32(e.qkey);
    o.u32(0);
    return b;
}

Result<EndpointInfo> decodeEndpointInfo(ByteView bytes) {
    if (bytes.size() < EndpointInfo::kBytes) {
        return Status::badDescriptor("ibverbs endpoint info is " + std::to_string(bytes.size()) +
                                     " bytes, expected " + std::to_string(EndpointInfo::kBytes));
    }
    In in(bytes);
    EndpointInfo e;
    uint32_t magic = 0;
    uint8_t version = 0;
    uint16_t reserved16 = 0;
    uint32_t reserved32 = 0;
    in.u32(&magic);
    in.u8(&version);
    if (magic != EndpointInfo::kMagic)
        return Status::badDescriptor("ibverbs endpoint info has a wrong magic");
    if (version != EndpointInfo::kVersion) {
        return Status::badDescriptor("ibverbs endpoint info version " + std::to_string(version) +
                                     " is not supported (this build speaks " +
                                     std::to_string(EndpointInfo::kVersion) + ")");
    }
    in.u8(&e.link_layer);
    in.u8(&e.mtu);
    in.u8(&e.port);
    in.raw(e.gid.raw, 16);
    in.u16(&e.lid);
    in.u16(&reserved16);
    in.u32(&e.ud_qpn);
    in.u32(&e.qkey);
    in.u32(&reserved32);
    if (e.mtu < IBV_MTU_256 || e.mtu > IBV_MTU_4096) {
        return Status::badDescriptor("ibverbs endpoint info has an invalid MTU code " +
                                     std::to_string(e.mtu));
    }
    if (e.ud_qpn == 0 || e.ud_qpn > 0xffffff) {
        return Status::badDescriptor("ibverbs endpoint info has an invalid UD QPN");
    }
    return e;
}

bool hasAuthTrailer(CmType type) {
    return type == CmType::kConnectRequest || type == CmType::kConnectReply || type == CmType::kDisconnect;
}

Bytes encodeCm(const CmMessage& m, ByteView secret, std::string_view label) {
    Bytes b;
    b.reserve(128 + m.name.size());
    Out o(b);
    o.u32(CmMessage::kMagic);
    o.u8(CmMessage::kVersion);
    o.u8(static_cast<uint8_t>(m.type));
    o.u16(0);  // length, patched below
    o.u64(m.conn_id);
    o.u64(m.src_instance);
    o.u64(m.dst_instance);
    if (m.type == CmType::kConnectRequest || m.type == CmType::kConnectReply) {
        o.raw(m.gid.raw, 16);
        o.u32(m.ud_qpn);
        o.u32(m.qkey);
        o.u16(m.lid);
        o.u8(m.mtu);
        o.u8(m.rd_atomic);
        o.u32(m.generation);
        o.u8(static_cast<uint8_t>(m.qps.size()));
        o.u8(0);
        o.u8(0);
        o.u8(0);
        for (const auto& q : m.qps) {
            o.u32(q.qpn);
            o.u32(q.psn);
        }
        const size_t n = std::min(m.name.size(), CmMessage::kMaxName);
        o.u16(static_cast<uint16_t>(n));
        o.raw(m.name.data(), n);
    } else if (m.type == CmType::kReject) {
        o.u32(static_cast<uint32_t>(m.reason));
        const size_t n = std::min<size_t>(m.text.size(), 512);
        o.u16(static_cast<uint16_t>(n));
        o.raw(m.text.data(), n);
    } else if (m.type == CmType::kChallenge) {
        o.raw(m.initiator_nonce.data(), auth::kNonceBytes);
        o.raw(m.target_nonce.data(), auth::kNonceBytes);
    }
    if (hasAuthTrailer(m.type)) {
        o.raw(m.initiator_nonce.data(), auth::kNonceBytes);
        o.raw(m.target_nonce.data(), auth::kNonceBytes);
    }
    const uint16_t len = static_cast<uint16_t>(b.size() + (hasAuthTrailer(m.type) ? auth::kMacBytes : 0));
    std::memcpy(b.data() + 6, &len, 2);
    if (hasAuthTrailer(m.type)) {
        const auth::Mac mac = secret.empty() ? m.mac : auth::mac(secret, {auth::view(label), ByteView(b)});
        o.raw(mac.data(), mac.size());
    }
    return b;
}

bool verifyCm(const CmMessage& msg, ByteView secret, std::string_view label) {
    if (secret.empty() || msg.signed_bytes.empty()) return false;
    const auth::Mac expected = auth::mac(secret, {auth::view(label), ByteView(msg.signed_bytes)});
    return auth::equal(auth::view(expected), auth::view(msg.mac));
}

std::optional<CmMessage> decodeCm(ByteView bytes) {
    In in(bytes);
    CmMessage m;
    uint32_t magic = 0;
    uint8_t version = 0, type = 0;
    uint16_t length = 0;
    if (!in.u32(&magic) || magic != CmMessage::kMagic) return std::nullopt;
    if (!in.u8(&version) || version != CmMessage::kVersion) return std::nullopt;
    if (!in.u8(&type) || type < 1 || type > 5) return std::nullopt;
    if (!in.u16(&length) || length < CmMessage::kHeaderBytes || length > bytes.size()) return std::nullopt;
    In body(bytes.first(length));
    body.skip(8);
    m.type = static_cast<CmType>(type);
    body.u64(&m.conn_id);
    body.u64(&m.src_instance);
    body.u64(&m.dst_instance);
    if (m.type == CmType::kConnectRequest || m.type == CmType::kConnectReply) {
        uint8_t nqp = 0, pad = 0;
        if (!body.raw(m.gid.raw, 16) || !body.u32(&m.ud_qpn) || !body.u32(&m.qkey) || !body.u16(&m.lid) ||
            !body.u8(&m.mtu) || !body.u8(&m.rd_atomic) || !body.u32(&m.generation) || !body.u8(&nqp) ||
            !body.u8(&pad) || !body.u8(&pad) || !body.u8(&pad)) {
            return std::nullopt;
        }
        if (nqp == 0 || nqp > CmMessage::kMaxQps) return std::nullopt;
        m.qps.resize(nqp);
        for (auto& q : m.qps) {
            if (!body.u32(&q.qpn) || !body.u32(&q.psn)) return std::nullopt;
        }
        uint16_t n = 0;
        if (!body.u16(&n) || n > CmMessage::kMaxName) return std::nullopt;
        m.name.resize(n);
        if (!body.raw(m.name.data(), n)) return std::nullopt;
    } else if (m.type == CmType::kReject) {
        uint32_t reason = 0;
        uint16_t n = 0;
        if (!body.u32(&reason) || !body.u16(&n)) return std::nullopt;
        m.reason = static_cast<RejectReason>(reason);
        m.text.resize(n);
        if (!body.raw(m.text.data(), n)) return std::nullopt;
    } else if (m.type == CmType::kChallenge) {
        if (!body.raw(m.initiator_nonce.data(), auth::kNonceBytes) ||
            !body.raw(m.target_nonce.data(), auth::kNonceBytes)) {
            return std::nullopt;
        }
    }
    if (hasAuthTrailer(m.type)) {
        // The trailer ends the message: MAC last, covering everything before it.
        if (length < CmMessage::kHeaderBytes + CmMessage::kAuthBytes) return std::nullopt;
        In tail(bytes.subspan(length - CmMessage::kAuthBytes, CmMessage::kAuthBytes));
        tail.raw(m.initiator_nonce.data(), auth::kNonceBytes);
        tail.raw(m.target_nonce.data(), auth::kNonceBytes);
        tail.raw(m.mac.data(), auth::kMacBytes);
        m.signed_bytes.assign(bytes.begin(), bytes.begin() + (length - auth::kMacBytes));
    }
    return m;
}

void writeNotifyHeader(uint8_t* out, uint32_t payload_length) {
    const uint32_t magic = NotifyHeader::kMagic;
    std::memcpy(out, &magic, 4);
    std::memcpy(out + 4, &payload_length, 4);
}

std::optional<ByteView> parseNotify(ByteView message) {
    if (message.size() < NotifyHeader::kBytes) return std::nullopt;
    uint32_t magic = 0, length = 0;
    std::memcpy(&magic, message.data(), 4);
    std::memcpy(&length, message.data() + 4, 4);
    if (magic != NotifyHeader::kMagic || length > kMaxNotifyPayload ||
        length != message.size() - NotifyHeader::kBytes) {
        return std::nullopt;
    }
    return message.subspan(NotifyHeader::kBytes, length);
}

}  // namespace kvxfer::ib
