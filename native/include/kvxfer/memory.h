// Memory kinds: what a registered range of memory is, so the core registers it only with
// the backends that can reach it and peers know what they are addressing.
#pragma once

#include <cstdint>
#include <string>

namespace kvxfer {

enum class MemoryKind : uint8_t {
    kHost = 0,           // ordinary host memory of this process
    kHostShareable = 1,  // host memory a same-host peer can map (memfd-backed, kvxfer.empty)
    kCuda = 2,           // CUDA device memory; `device` is the CUDA ordinal
};
constexpr uint32_t kMemoryKindCount = 3;

const char* memoryKindName(MemoryKind kind);

// A bit per kind, for capabilities.
constexpr uint32_t memoryKindBit(MemoryKind kind) { return 1u << static_cast<uint32_t>(kind); }

// One range of memory handed to the core for registration.
struct MemorySpan {
    uint8_t* base = nullptr;
    uint64_t length = 0;
    MemoryKind kind = MemoryKind::kHost;
    int32_t device = -1;  // CUDA ordinal for kCuda; -1 otherwise
};

}  // namespace kvxfer
