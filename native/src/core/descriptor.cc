#include "kvxfer/descriptor.h"

#include <array>
#include <cstring>
#include <set>

namespace kvxfer {
namespace {

// Layout on the wire (little-endian):
//   u32 magic | u16 version | u16 reserved | u32 body_length | u32 crc32(body) | body
// body: str name | u64 instance | str host | u32 pid | u16 nbackends {str name, blob info}
//       | u32 nregions {u32 id, u64 base, u64 len, u8 has_layout [layout], blob key x nbackends,
//                       fields}                                                  (fields: v2)
//       | fields                                                                 (v2)
// fields: u16 count {u16 tag, blob value}; unknown tags are skipped.
// Region field tags: 1 = memory (u8 kind, i32 device).
// Descriptor field tags: 1 = secret (the engine's connection capability, 32 bytes).
constexpr size_t kHeaderBytes = 16;
constexpr uint16_t kTagMemory = 1;
constexpr uint16_t kTagSecret = 1;

class Writer {
public:
    void u8(uint8_t v) { out_.push_back(v); }
    void u16(uint16_t v) { raw(&v, 2); }
    void u32(uint32_t v) { raw(&v, 4); }
    void u64(uint64_t v) { raw(&v, 8); }
    void str(const std::string& s) { blob({reinterpret_cast<const uint8_t*>(s.data()), s.size()}); }
    void blob(ByteView b) {
        u32(static_cast<uint32_t>(b.size()));
        out_.insert(out_.end(), b.begin(), b.end());
    }
    Bytes& bytes() { return out_; }

private:
    void raw(const void* p, size_t n) {
        const auto* b = static_cast<const uint8_t*>(p);
        out_.insert(out_.end(), b, b + n);
    }
    Bytes out_;
};

class Reader {
public:
    explicit Reader(ByteView in) : in_(in) {}
    bool u8(uint8_t* v) { return raw(v, 1); }
    bool u16(uint16_t* v) { return raw(v, 2); }
    bool u32(uint32_t* v) { return raw(v, 4); }
    bool u64(uint64_t* v) { return raw(v, 8); }
    bool blob(Bytes* b, size_t max) {
        uint32_t n = 0;
        if (!u32(&n) || n > max || n > in_.size() - pos_) return false;
        b->assign(in_.begin() + pos_, in_.begin() + pos_ + n);
        pos_ += n;
        return true;
    }
    bool str(std::string* s, size_t max) {
        Bytes b;
        if (!blob(&b, max)) return false;
        s->assign(b.begin(), b.end());
        return true;
    }
    bool atEnd() const { return pos_ == in_.size(); }

private:
    bool raw(void* p, size_t n) {
        if (n > in_.size() - pos_) return false;
        std::memcpy(p, in_.data() + pos_, n);
        pos_ += n;
        return true;
    }
    ByteView in_;
    size_t pos_ = 0;
};

void writeLayout(Writer& w, const KvLayout& l) {
    w.u32(l.num_layers);
    w.u32(l.num_kv);
    w.u64(l.num_blocks);
    w.u64(l.block_bytes);
    w.u64(l.block_stride);
    w.u64(l.kv_stride);
    w.u64(l.layer_stride);
    w.u64(l.offset);
}

bool readLayout(Reader& r, KvLayout* l) {
    return r.u32(&l->num_layers) && r.u32(&l->num_kv) && r.u64(&l->num_blocks) && r.u64(&l->block_bytes) &&
           r.u64(&l->block_stride) && r.u64(&l->kv_stride) && r.u64(&l->layer_stride) && r.u64(&l->offset);
}

const std::array<uint32_t, 256>& crcTable() {
    static const std::array<uint32_t, 256> table = [] {
        std::array<uint32_t, 256> t{};
        for (uint32_t i = 0; i < 256; ++i) {
            uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        return t;
    }();
    return table;
}

Status malformed(const std::string& what) {
    return Status::badDescriptor("malformed peer descriptor: " + what);
}

}  // namespace

uint32_t crc32(ByteView bytes, uint32_t seed) {
    const auto& t = crcTable();
    uint32_t c = ~seed;
    for (uint8_t b : bytes) c = t[(c ^ b) & 0xff] ^ (c >> 8);
    return ~c;
}

Bytes encodeDescriptor(const PeerDescriptor& d) {
    Writer body;
    body.str(d.engine_name);
    body.u64(d.instance_id);
    body.str(d.host_id);
    body.u32(d.pid);
    body.u16(static_cast<uint16_t>(d.backends.size()));
    for (const auto& b : d.backends) {
        body.str(b.name);
        body.blob(b.info);
    }
    body.u32(static_cast<uint32_t>(d.regions.size()));
    for (const auto& r : d.regions) {
        body.u32(r.id);
        body.u64(r.base_address);
        body.u64(r.length);
        body.u8(r.layout.has_value() ? 1 : 0);
        if (r.layout) writeLayout(body, *r.layout);
        for (size_t i = 0; i < d.backends.size(); ++i) {
            body.blob(i < r.remote_keys.size() ? ByteView(r.remote_keys[i]) : ByteView());
        }
        const bool has_memory = r.kind != MemoryKind::kHost || r.device != -1;
        body.u16(has_memory ? 1 : 0);
        if (has_memory) {
            Writer f;
            f.u8(static_cast<uint8_t>(r.kind));
            f.u32(static_cast<uint32_t>(r.device));
            body.u16(kTagMemory);
            body.blob(f.bytes());
        }
    }
    body.u16(d.secret.empty() ? 0 : 1);
    if (!d.secret.empty()) {
        body.u16(kTagSecret);
        body.blob(d.secret);
    }
    Writer out;
    out.u32(PeerDescriptor::kMagic);
    out.u16(PeerDescriptor::kVersion);
    out.u16(0);
    out.u32(static_cast<uint32_t>(body.bytes().size()));
    out.u32(crc32(body.bytes()));
    out.bytes().insert(out.bytes().end(), body.bytes().begin(), body.bytes().end());
    return std::move(out.bytes());
}

Result<PeerDescriptor> decodeDescriptor(ByteView bytes) {
    Reader h(bytes);
    uint32_t magic = 0, body_len = 0, crc = 0;
    uint16_t version = 0, reserved = 0;
    if (!h.u32(&magic) || !h.u16(&version) || !h.u16(&reserved) || !h.u32(&body_len) || !h.u32(&crc)) {
        return malformed("truncated header (" + std::to_string(bytes.size()) + " bytes)");
    }
    if (magic != PeerDescriptor::kMagic) return malformed("bad magic, not a kvxfer descriptor");
    if (version < PeerDescriptor::kOldestReadable || version > PeerDescriptor::kVersion) {
        return Status::badDescriptor("peer descriptor version " + std::to_string(version) +
                                     " is not supported (this build speaks " +
                                     std::to_string(PeerDescriptor::kVersion) + ")");
    }
    if (reserved != 0) return malformed("reserved header field is not zero");
    if (body_len != bytes.size() - kHeaderBytes) {
        return malformed("body length " + std::to_string(body_len) + " but " +
                         std::to_string(bytes.size() - kHeaderBytes) + " bytes follow the header");
    }
    ByteView body = bytes.subspan(kHeaderBytes);
    if (crc32(body) != crc) return malformed("checksum mismatch (corrupted in transit?)");

    Reader r(body);
    PeerDescriptor d;
    uint16_t nbackends = 0;
    if (!r.str(&d.engine_name, PeerDescriptor::kMaxName) || d.engine_name.empty()) {
        return malformed("engine name");
    }
    if (!r.u64(&d.instance_id) || !r.str(&d.host_id, PeerDescriptor::kMaxName) || !r.u32(&d.pid) ||
        !r.u16(&nbackends)) {
        return malformed("identity fields");
    }
    if (nbackends > PeerDescriptor::kMaxBackends) return malformed("too many backends");
    std::set<std::string> backend_names;
    for (uint16_t i = 0; i < nbackends; ++i) {
        BackendEndpoint b;
        if (!r.str(&b.name, PeerDescriptor::kMaxName) || !r.blob(&b.info, PeerDescriptor::kMaxBlob)) {
            return malformed("backend entry " + std::to_string(i));
        }
        if (!backend_names.insert(b.name).second) return malformed("duplicate backend " + b.name);
        d.backends.push_back(std::move(b));
    }
    uint32_t nregions = 0;
    if (!r.u32(&nregions) || nregions > PeerDescriptor::kMaxRegions) return malformed("region count");
    std::set<uint32_t> ids;
    for (uint32_t i = 0; i < nregions; ++i) {
        RegionDescriptor reg;
        uint8_t has_layout = 0;
        if (!r.u32(&reg.id) || !r.u64(&reg.base_address) || !r.u64(&reg.length) || !r.u8(&has_layout) ||
            has_layout > 1) {
            return malformed("region entry " + std::to_string(i));
        }
        if (reg.length == 0 || reg.base_address + reg.length < reg.base_address) {
            return malformed("region " + std::to_string(reg.id) + " has an impossible range");
        }
        if (has_layout) {
            KvLayout l;
            if (!readLayout(r, &l)) return malformed("layout of region " + std::to_string(reg.id));
            Status st = l.validate(reg.length);
            if (!st) return malformed("layout of region " + std::to_string(reg.id) + ": " + st.message());
            reg.layout = l;
        }
        for (uint16_t k = 0; k < nbackends; ++k) {
            Bytes key;
            if (!r.blob(&key, PeerDescriptor::kMaxBlob)) {
                return malformed("key " + std::to_string(k) + " of region " + std::to_string(reg.id));
            }
            reg.remote_keys.push_back(std::move(key));
        }
        if (version >= 2) {
            uint16_t nfields = 0;
            if (!r.u16(&nfields) || nfields > PeerDescriptor::kMaxFields) {
                return malformed("field count of region " + std::to_string(reg.id));
            }
            for (uint16_t f = 0; f < nfields; ++f) {
                uint16_t tag = 0;
                Bytes value;
                if (!r.u16(&tag) || !r.blob(&value, PeerDescriptor::kMaxBlob)) {
                    return malformed("field " + std::to_string(f) + " of region " + std::to_string(reg.id));
                }
                if (tag == kTagMemory) {
                    Reader v(value);
                    uint8_t kind = 0;
                    uint32_t device = 0;
                    if (!v.u8(&kind) || !v.u32(&device) || kind >= kMemoryKindCount) {
                        return malformed("memory field of region " + std::to_string(reg.id));
                    }
                    reg.kind = static_cast<MemoryKind>(kind);
                    reg.device = static_cast<int32_t>(device);
                }
            }
        }
        if (!ids.insert(reg.id).second) return malformed("duplicate region id " + std::to_string(reg.id));
        d.regions.push_back(std::move(reg));
    }
    if (version >= 2) {
        uint16_t nfields = 0;
        if (!r.u16(&nfields) || nfields > PeerDescriptor::kMaxFields) return malformed("descriptor fields");
        for (uint16_t f = 0; f < nfields; ++f) {
            uint16_t tag = 0;
            Bytes value;
            if (!r.u16(&tag) || !r.blob(&value, PeerDescriptor::kMaxBlob))
                return malformed("descriptor field");
            if (tag == kTagSecret) {
                if (value.size() != PeerDescriptor::kSecretBytes) return malformed("secret field");
                d.secret = std::move(value);
            }
        }
    }
    if (!r.atEnd()) return malformed("trailing bytes");
    return d;
}

}  // namespace kvxfer
