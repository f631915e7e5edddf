#include "kvxfer/config.h"

#include <cerrno>
#include <cstdlib>
#include <functional>
#include <limits>

namespace kvxfer {
namespace {

using Setter = std::function<bool(EngineConfig&, const std::string&)>;

struct Var {
    const char* name;
    const char* field;
    Setter set;
};

bool parseU64(const std::string& s, uint64_t lo, uint64_t hi, uint64_t* out) {
    if (s.empty() || s[0] == '-') return false;
    errno = 0;
    char* end = nullptr;
    const unsigned long long v = std::strtoull(s.c_str(), &end, 0);
    if (errno != 0 || end == s.c_str() || *end != '\0' || v < lo || v > hi) return false;
    *out = v;
    return true;
}

template <typename T>
Setter number(T IbverbsConfig::*field, uint64_t lo, uint64_t hi) {
    return [field, lo, hi](EngineConfig& c, const std::string& s) {
        uint64_t v = 0;
        if (!parseU64(s, lo, hi, &v)) return false;
        c.backend.ibverbs.*field = static_cast<T>(v);
        return true;
    };
}

const std::vector<Var>& vars() {
    static const std::vector<Var> list = {
        {"KVXFER_LOOPBACK_THREADS", "backend.loopback.threads",
         [](EngineConfig& c, const std::string& s) {
             uint64_t v = 0;
             if (!parseU64(s, 1, 256, &v)) return false;
             c.backend.loopback.threads = static_cast<uint32_t>(v);
             return true;
         }},
        {"KVXFER_LOOPBACK_INLINE_MAX_BYTES", "backend.loopback.inline_max_bytes",
         [](EngineConfig& c, const std::string& s) {
             return parseU64(s, 0, 16ull << 20, &c.backend.loopback.inline_max_bytes);
         }},
        {"KVXFER_FAULT_SCRIPT", "backend.fault.script",
         [](EngineConfig& c, const std::string& s) {
             c.backend.fault.script = s;
             return true;
         }},
        {"KVXFER_SHM_THREADS", "backend.shm.threads",
         [](EngineConfig& c, const std::string& s) {
             uint64_t v = 0;
             if (!parseU64(s, 0, 256, &v)) return false;
             c.backend.shm.threads = static_cast<uint32_t>(v);
             return true;
         }},
        {"KVXFER_SHM_INLINE_MAX_BYTES", "backend.shm.inline_max_bytes",
         [](EngineConfig& c, const std::string& s) {
             return parseU64(s, 0, 16ull << 20, &c.backend.shm.inline_max_bytes);
         }},
        {"KVXFER_TCP_LISTEN", "backend.tcp.listen",
         [](EngineConfig& c, const std::string& s) {
             c.backend.tcp.listen = s;
             return true;
         }},
        {"KVXFER_TCP_INLINE_MAX_BYTES", "backend.tcp.inline_max_bytes",
         [](EngineConfig& c, const std::string& s) {
             return parseU64(s, 0, 16ull << 20, &c.backend.tcp.inline_max_bytes);
         }},
        {"KVXFER_TCP_SPIN_US", "backend.tcp.spin_us",
         [](EngineConfig& c, const std::string& s) {
             uint64_t v = 0;
             if (!parseU64(s, 0, 1000000, &v)) return false;
             c.backend.tcp.spin_us = static_cast<uint32_t>(v);
             return true;
         }},
        {"KVXFER_IBVERBS_DEVICE", "backend.ibverbs.device",
         [](EngineConfig& c, const std::string& s) {
             c.backend.ibverbs.device = s;
             return true;
         }},
        {"KVXFER_IBVERBS_GID_INDEX", "backend.ibverbs.gid_index",
         [](EngineConfig& c, const std::string& s) {
             uint64_t v = 0;
             if (!parseU64(s, 0, 65535, &v)) return false;
             c.backend.ibverbs.gid_index = static_cast<int32_t>(v);
             return true;
         }},
        {"KVXFER_IBVERBS_PORT_NUM", "backend.ibverbs.port_num",
         [](EngineConfig& c, const std::string& s) {
             uint64_t v = 0;
             if (!parseU64(s, 1, 255, &v)) return false;
             c.backend.ibverbs.port_num = static_cast<int32_t>(v);
             return true;
         }},
        {"KVXFER_IBVERBS_QPS_PER_PEER", "backend.ibverbs.qps_per_peer",
         number(&IbverbsConfig::qps_per_peer, 1, 16)},
        {"KVXFER_IBVERBS_SQ_DEPTH", "backend.ibverbs.sq_depth", number(&IbverbsConfig::sq_depth, 16, 8192)},
        {"KVXFER_IBVERBS_RECV_BUFFERS", "backend.ibverbs.recv_buffers",
         number(&IbverbsConfig::recv_buffers, 4, 4096)},
        {"KVXFER_IBVERBS_MAX_WR_BYTES", "backend.ibverbs.max_wr_bytes",
         number(&IbverbsConfig::max_wr_bytes, 4096, uint64_t{1} << 30)},
        {"KVXFER_IBVERBS_ACK_TIMEOUT", "backend.ibverbs.ack_timeout",
         number(&IbverbsConfig::ack_timeout, 1, 31)},
        {"KVXFER_IBVERBS_RETRY_CNT", "backend.ibverbs.retry_cnt", number(&IbverbsConfig::retry_cnt, 0, 7)},
        {"KVXFER_IBVERBS_RNR_RETRY", "backend.ibverbs.rnr_retry", number(&IbverbsConfig::rnr_retry, 0, 7)},
        {"KVXFER_IBVERBS_TRAFFIC_CLASS", "backend.ibverbs.traffic_class",
         number(&IbverbsConfig::traffic_class, 0, 255)},
        {"KVXFER_IBVERBS_SERVICE_LEVEL", "backend.ibverbs.service_level",
         number(&IbverbsConfig::service_level, 0, 15)},
        {"KVXFER_IBVERBS_SPIN_US", "backend.ibverbs.spin_us", number(&IbverbsConfig::spin_us, 0, 100000)},
        {"KVXFER_IBVERBS_DEBUG", "backend.ibverbs.debug",
         [](EngineConfig& c, const std::string& s) {
             if (s != "0" && s != "1") return false;
             c.backend.ibverbs.debug = s == "1";
             return true;
         }},
    };
    return list;
}

}  // namespace

Status applyEnvironment(EngineConfig& config) {
    for (const auto& v : vars()) {
        const char* value = std::getenv(v.name);
        if (value == nullptr || *value == '\0') continue;
        if (!v.set(config, value)) {
            return Status::invalidArgument(std::string("environment variable ") + v.name + "='" + value +
                                           "' is not a valid value for " + v.field);
        }
    }
    return Status::ok();
}

std::vector<std::pair<std::string, std::string>> environmentVariables() {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto& v : vars()) out.emplace_back(v.name, v.field);
    return out;
}

Status setBackendField(EngineConfig& config, const std::string& field, const std::string& value) {
    const std::string full = field.rfind("backend.", 0) == 0 ? field : "backend." + field;
    for (const auto& v : vars()) {
        if (full != v.field) continue;
        if (!v.set(config, value)) {
            return Status::invalidArgument("'" + value + "' is not a valid value for " + v.field);
        }
        return Status::ok();
    }
    return Status::notFound("unknown configuration key '" + field + "'");
}

}  // namespace kvxfer
