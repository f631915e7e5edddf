// Typed engine configuration: one section per backend, mirrored field for field by the
// Python dataclasses in kvxfer/config.py, plus one documented environment overlay.
//
// Environment overlay (applied by Engine::create, after the caller's values: the
// environment wins, so an operator can retune a deployed service without code changes):
//   KVXFER_<SECTION>_<FIELD>, upper case, e.g. KVXFER_TCP_LISTEN=127.0.0.1:7000,
//   KVXFER_IBVERBS_DEVICE=rxe0, KVXFER_IBVERBS_QPS_PER_PEER=4, KVXFER_SHM_THREADS=2.
// A malformed value fails engine creation with kInvalidArgument naming the variable.
// environmentVariables() lists every recognised name (docs/api.md prints the table).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "kvxfer/status.h"

namespace kvxfer {

struct LoopbackConfig {
    uint32_t threads = 1;  // copy threads
    // Transfers of at most this many bytes run on the posting thread (the inline path).
    uint64_t inline_max_bytes = 64 * 1024;
};

struct ShmConfig {
    uint32_t threads = 0;  // copy threads; 0 = min(4, cores)
    // Transfers of at most this many bytes run on the posting thread (the inline path).
    uint64_t inline_max_bytes = 64 * 1024;
};

struct TcpConfig {
    // Listening address: "HOST:PORT", ":PORT", "HOST:" or "HOST" (IPv4 literal,
    // "localhost" or "*"). "" = every interface, an ephemeral port.
    std::string listen;
    // Transfers of at most this many bytes run on the posting thread (the inline path).
    uint64_t inline_max_bytes = 64 * 1024;
    // Busy-poll, in microseconds, before a thread sleeps for the next frame: the target's
    // listener after it served a request, the caller waiting for an inline write's ACK.
    // Bounded and adaptive (only right after traffic; rarely once spins find nothing);
    // 0 = off, at most 1000000. Costs up to this much CPU per request.
    uint32_t spin_us = 50;
};

struct IbverbsConfig {
    std::string device;      // "" = the first device with an ACTIVE port
    int32_t gid_index = -1;  // -1 = best RoCE v2 GID (IPv4-mapped first)
    int32_t port_num = 0;    // 0 = first ACTIVE port
    uint32_t qps_per_peer = 2;
    uint32_t sq_depth = 256;
    uint32_t recv_buffers = 64;
    uint64_t max_wr_bytes = 1 << 20;
    uint32_t ack_timeout = 15;  // 4.096 us * 2^ack_timeout
    uint32_t retry_cnt = 6;     // 6, not 7: rxe treats 7 as "retry forever"
    uint32_t rnr_retry = 7;
    uint32_t traffic_class = 0;
    uint32_t service_level = 0;
    uint32_t spin_us = 20;  // busy-poll before sleeping on the completion channel
    bool debug = false;     // one stderr line per connection event
};

struct FaultConfig {
    // Faults to inject (native/src/backends/fault/README.md), e.g. "delay=5;fail@3=REMOTE;hang@4".
    std::string script;
};

struct BackendConfigs {
    LoopbackConfig loopback;
    FaultConfig fault;
    ShmConfig shm;
    TcpConfig tcp;
    IbverbsConfig ibverbs;
};

struct EngineConfig {
    std::string name;
    // Backends to start, in order of preference for reaching a peer. Empty = every
    // available backend that is on by default.
    std::vector<std::string> backends;
    std::chrono::milliseconds default_timeout{30000};  // transfer deadline when a post names none
    std::chrono::milliseconds connect_timeout{10000};  // per backend attempt in add_peer
    BackendConfigs backend;
};

// Applies the KVXFER_* environment overlay to `config` (see the header comment).
Status applyEnvironment(EngineConfig& config);
// Every environment variable the overlay reads, with the field it sets.
std::vector<std::pair<std::string, std::string>> environmentVariables();
// Sets one backend field by its name in environmentVariables() ("backend.tcp.listen"; the
// "backend." prefix may be left out), with the overlay's parsing: kNotFound for an
// unknown name, kInvalidArgument for a bad value. For callers that read configuration as
// text (the C ABI).
Status setBackendField(EngineConfig& config, const std::string& field, const std::string& value);

}  // namespace kvxfer
