// The peer descriptor: what one engine publishes so another can reach its memory.
//
// Versioned, checksummed, bounds-checked bytes. Its size depends on the number of
// registered regions and backends, never on the number of blocks: a 2048-block KV pool
// is one region entry with its layout. Decoding never trusts a length field.
//
// Version 2 can evolve: every region entry and the descriptor itself end with a list of
// optional fields (u16 tag, u32 length, bytes). A reader skips tags it does not know, so
// a newer writer can add fields without breaking older v2 readers. Version 1 (no
// optional fields, host memory only) is still read.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvxfer/memory.h"
#include "kvxfer/plan.h"
#include "kvxfer/status.h"

namespace kvxfer {

using Bytes = std::vector<uint8_t>;
using ByteView = std::span<const uint8_t>;

struct RegionDescriptor {
    uint32_t id = 0;
    uint64_t base_address = 0;  // in the owner's address space
    uint64_t length = 0;
    std::optional<KvLayout> layout;
    MemoryKind kind = MemoryKind::kHost;
    int32_t device = -1;             // CUDA ordinal for kCuda
    std::vector<Bytes> remote_keys;  // one per PeerDescriptor::backends entry (may be empty)
    bool operator==(const RegionDescriptor&) const = default;
};

struct BackendEndpoint {
    std::string name;
    Bytes info;  // opaque to the core: produced and consumed by that backend only
    bool operator==(const BackendEndpoint&) const = default;
};

struct PeerDescriptor {
    static constexpr uint32_t kMagic = 0x4458564b;  // "KVXD" little-endian
    static constexpr uint16_t kVersion = 2;
    static constexpr uint16_t kOldestReadable = 1;
    static constexpr size_t kMaxFields = 64;  // optional fields per entry
    // Decoder limits: anything larger is rejected as malformed.
    static constexpr size_t kMaxName = 256;
    static constexpr size_t kMaxBackends = 16;
    static constexpr size_t kMaxRegions = 65536;
    static constexpr size_t kMaxBlob = 64 * 1024;

    std::string engine_name;
    uint64_t instance_id = 0;  // random per Engine; a restarted peer gets a new one
    std::string host_id;       // equal on one host (boot id); gates same-host backends
    uint32_t pid = 0;
    std::vector<BackendEndpoint> backends;
    std::vector<RegionDescriptor> regions;
    // The capability to connect: every connection to this engine (tcp, shm socket) proves
    // it with an HMAC over a fresh nonce (docs/security.md). Whoever holds the descriptor
    // holds it: ship descriptors like passwords. Empty only in descriptors of older writers.
    static constexpr size_t kSecretBytes = 32;
    Bytes secret;
    bool operator==(const PeerDescriptor&) const = default;
};

Bytes encodeDescriptor(const PeerDescriptor& descriptor);
// kBadDescriptor on wrong magic or version, truncation, bad checksum, limits exceeded,
// trailing bytes, or inconsistent fields (key count != backend count, duplicate ids).
Result<PeerDescriptor> decodeDescriptor(ByteView bytes);

uint32_t crc32(ByteView bytes, uint32_t seed = 0);

}  // namespace kvxfer
