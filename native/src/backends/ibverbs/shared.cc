// ibverbs backend: the verbs resources `Shared` owns (CQ, SRQ, receive / notification / UD
// slabs, the UD queue pair of the connection manager), created in init() and destroyed after
// every connection's queue pairs.
#include "backends/ibverbs/shared.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>

namespace kvxfer::ib {

std::string hex(uint64_t v) {
    char buf[24];
    std::snprintf(buf, sizeof(buf), "%llx", static_cast<unsigned long long>(v));
    return buf;
}

Shared::~Shared() {
    // The progress thread has exited: nothing else touches these objects.
    teardownConnections();
    ud_ahs_.clear();
    ud_qp_.reset();
    srq_.reset();
    cq_.reset();
    if (wake_fd_ >= 0) ::close(wake_fd_);
}

Status Shared::init() {
    const ibv_device_attr& a = device_->attr();
    t_.sq_depth = std::min<uint32_t>(t_.sq_depth, static_cast<uint32_t>(std::max(16, a.max_qp_wr)));
    t_.recv_buffers = std::min<uint32_t>(t_.recv_buffers, static_cast<uint32_t>(std::max(4, a.max_srq_wr)));
    t_.cq_entries = std::min<uint32_t>(t_.cq_entries, static_cast<uint32_t>(std::max(256, a.max_cqe)));
    const uint32_t reserved = t_.recv_buffers + kUdRecvDepth + kUdSendSlots + 64;
    if (t_.cq_entries <= reserved + t_.sq_depth) {
        return Status::unsupported("ibverbs: device " + device_->name() + " allows only " +
                                   std::to_string(a.max_cqe) + " CQ entries");
    }
    send_budget_ = t_.cq_entries - reserved;
    responder_rd_atomic_ = static_cast<uint8_t>(std::clamp(a.max_qp_rd_atom, 1, 16));
    initiator_rd_atomic_ = static_cast<uint8_t>(std::clamp(a.max_qp_init_rd_atom, 1, 16));
    max_msg_ = device_->portAttr().max_msg_sz ? device_->portAttr().max_msg_sz : (1u << 31);

    wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) return Status::systemErrno("eventfd", errno);
    {
        ibv_context* c = device_->context();
        const int flags = ::fcntl(c->async_fd, F_GETFL);
        if (flags < 0 || ::fcntl(c->async_fd, F_SETFL, flags | O_NONBLOCK) != 0) {
            return Status::systemErrno("fcntl(O_NONBLOCK) on the async event fd", errno);
        }
    }
    KVXFER_ASSIGN_OR_RETURN(cq_, CompletionQueue::create(device_, static_cast<int>(t_.cq_entries)));
    KVXFER_ASSIGN_OR_RETURN(srq_, SharedReceiveQueue::create(device_, t_.recv_buffers));
    KVXFER_ASSIGN_OR_RETURN(recv_slab_, RegisteredSlab::create(device_, t_.recv_buffers, kNotifyBufferBytes,
                                                               IBV_ACCESS_LOCAL_WRITE));
    KVXFER_RETURN_IF_ERROR(growNotifySlots());
    KVXFER_ASSIGN_OR_RETURN(ud_slab_,
                            RegisteredSlab::create(device_, kUdRecvDepth + kUdSendSlots,
                                                   kGrhBytes + CmMessage::kMaxBytes, IBV_ACCESS_LOCAL_WRITE));
    KVXFER_ASSIGN_OR_RETURN(ud_qp_,
                            QueuePair::createUd(device_, cq_->cq(), kUdSendSlots, kUdRecvDepth, qkey_));
    for (uint32_t i = 0; i < t_.recv_buffers; ++i) KVXFER_RETURN_IF_ERROR(postSrqBuffer(i));
    for (uint32_t i = 0; i < kUdRecvDepth; ++i) KVXFER_RETURN_IF_ERROR(postUdBuffer(i));
    for (uint32_t i = 0; i < kUdSendSlots; ++i) free_ud_send_.push_back(static_cast<int>(kUdRecvDepth + i));
    KVXFER_RETURN_IF_ERROR(cq_->arm());
    return Status::ok();
}

void Shared::teardownConnections() {
    // QPs go before the CQ, SRQ and PD they use.
    for (auto* table : {&initiated_}) {
        for (auto& [id, conn] : *table) {
            for (auto& s : conn->slots) s.qp.reset();
        }
    }
    for (auto& [key, conn] : accepted_) {
        for (auto& s : conn->slots) s.qp.reset();
    }
    for (auto& conn : closing_) {
        for (auto& s : conn->slots) s.qp.reset();
    }
    by_qpn_.clear();
    initiated_.clear();
    accepted_.clear();
    closing_.clear();
    ready_queue_.clear();
}

}  // namespace kvxfer::ib
