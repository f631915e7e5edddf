// queue_pair: RC queue pairs (RESET -> INIT -> RTR -> RTS), the UD queue pair of the
// connection manager, the shared receive queue and address handles. RAII throughout;
// each object keeps its Device alive.
#pragma once

#include <cstdint>
#include <memory>

#include "backends/ibverbs/device.h"

namespace kvxfer::ib {

// Where an RC QP sends, and how (RTR attributes).
struct RcPath {
    uint32_t remote_qpn = 0;
    uint32_t remote_psn = 0;
    ibv_mtu mtu = IBV_MTU_1024;
    ibv_gid remote_gid{};
    uint16_t remote_lid = 0;
    uint8_t max_dest_rd_atomic = 1;  // READs the peer may have outstanding at us
    uint8_t min_rnr_timer = 12;      // 0.64 ms between RNR retries of a SEND to us
    uint8_t traffic_class = 0;
    uint8_t service_level = 0;
    uint8_t hop_limit = 64;
};

// Requester side (RTS attributes). The local ACK timeout is 4.096 us * 2^timeout per try;
// with retry_cnt retries a dead peer surfaces after about (retry_cnt + 1) times that.
struct RcTiming {
    uint8_t timeout = 15;       // 134 ms per try
    uint8_t retry_cnt = 6;      // -> 7 tries, about 1 s (0.96 s measured on rxe). Not 7: rxe
                                // (soft-RoCE) treats retry_cnt 7 as infinite, like rnr_retry.
    uint8_t rnr_retry = 7;      // 7 = retry forever while the peer's receive buffers are full
    uint8_t max_rd_atomic = 1;  // READs we keep outstanding at the peer
};

// Fills ibv_ah_attr for a destination on the device's chosen port and GID.
void fillAddress(const Device& device, const ibv_gid& remote_gid, uint16_t remote_lid, uint8_t traffic_class,
                 uint8_t service_level, uint8_t hop_limit, ibv_ah_attr* attr);

class SharedReceiveQueue {
public:
    static Result<std::unique_ptr<SharedReceiveQueue>> create(std::shared_ptr<Device> device,
                                                              uint32_t max_wr);
    ~SharedReceiveQueue();
    SharedReceiveQueue(const SharedReceiveQueue&) = delete;
    SharedReceiveQueue& operator=(const SharedReceiveQueue&) = delete;
    ibv_srq* srq() const { return srq_; }
    Status post(uint64_t wr_id, void* addr, uint32_t length, uint32_t lkey);

private:
    SharedReceiveQueue() = default;
    std::shared_ptr<Device> device_;
    ibv_srq* srq_ = nullptr;
};

class QueuePair {
public:
    struct RcCaps {
        uint32_t send_depth = 256;
        uint32_t max_send_sge = 2;
        uint32_t max_inline = 128;  // best effort: retried without inline data if refused
    };
    static Result<std::unique_ptr<QueuePair>> createRc(std::shared_ptr<Device> device, ibv_cq* cq,
                                                       ibv_srq* srq, const RcCaps& caps);
    // A UD QP brought up to RTS with `qkey` (its receive queue is its own).
    static Result<std::unique_ptr<QueuePair>> createUd(std::shared_ptr<Device> device, ibv_cq* cq,
                                                       uint32_t send_depth, uint32_t recv_depth,
                                                       uint32_t qkey);
    ~QueuePair();
    QueuePair(const QueuePair&) = delete;
    QueuePair& operator=(const QueuePair&) = delete;

    ibv_qp* qp() const { return qp_; }
    uint32_t qpn() const { return qp_->qp_num; }
    uint32_t sendDepth() const { return send_depth_; }
    uint32_t maxInline() const { return max_inline_; }
    uint32_t initialPsn() const { return psn_; }  // random 24-bit, chosen at creation

    Status toInit(int remote_access);
    Status toRtr(const RcPath& path);
    Status toRts(const RcTiming& timing);
    // Moves to ERROR: every outstanding WR completes (flushed) promptly.
    Status toError();

    Status post(ibv_send_wr* wr, ibv_send_wr** bad);
    Status postRecv(uint64_t wr_id, void* addr, uint32_t length, uint32_t lkey);

private:
    QueuePair() = default;
    std::shared_ptr<Device> device_;
    ibv_qp* qp_ = nullptr;
    uint32_t send_depth_ = 0;
    uint32_t max_inline_ = 0;
    uint32_t psn_ = 0;
};

class AddressHandle {
public:
    static Result<std::unique_ptr<AddressHandle>> create(std::shared_ptr<Device> device, const ibv_gid& gid,
                                                         uint16_t lid);
    ~AddressHandle();
    AddressHandle(const AddressHandle&) = delete;
    AddressHandle& operator=(const AddressHandle&) = delete;
    ibv_ah* ah() const { return ah_; }

private:
    AddressHandle() = default;
    std::shared_ptr<Device> device_;
    ibv_ah* ah_ = nullptr;
};

}  // namespace kvxfer::ib
