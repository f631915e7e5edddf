// ibverbs backend: the tunables, from IbverbsConfig clamped to what the backend supports
// (the device clamps them further in Shared::init), and the process-wide debug switch.
#include "backends/ibverbs/shared.h"

namespace kvxfer::ib {

Tunables Tunables::from(const IbverbsConfig& c) {
    Tunables t;
    t.qps_per_peer = std::clamp<uint32_t>(c.qps_per_peer, 1, CmMessage::kMaxQps);
    t.sq_depth = std::clamp<uint32_t>(c.sq_depth, 16, 8192);
    t.signal_interval = std::max<uint32_t>(1, std::min<uint32_t>(t.sq_depth / 4, 32));
    t.chain_max = static_cast<uint32_t>(std::min<uint64_t>(PostList::kMaxWrs, t.signal_interval));
    t.recv_buffers = std::clamp<uint32_t>(c.recv_buffers, 4, 4096);
    t.max_wr_bytes = std::clamp<uint64_t>(c.max_wr_bytes, 4096, uint64_t{1} << 30);
    t.timing.timeout = static_cast<uint8_t>(std::clamp<uint32_t>(c.ack_timeout, 1, 31));
    t.timing.retry_cnt = static_cast<uint8_t>(std::min<uint32_t>(c.retry_cnt, 7));
    t.timing.rnr_retry = static_cast<uint8_t>(std::min<uint32_t>(c.rnr_retry, 7));
    t.traffic_class = static_cast<uint8_t>(std::min<uint32_t>(c.traffic_class, 255));
    t.service_level = static_cast<uint8_t>(std::min<uint32_t>(c.service_level, 15));
    t.spin_us = std::min<uint32_t>(c.spin_us, 100000);
    return t;
}

std::atomic<bool> g_debug{false};
bool debugEnabled() { return g_debug.load(std::memory_order_relaxed); }

}  // namespace kvxfer::ib
