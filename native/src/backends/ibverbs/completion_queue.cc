#include "backends/ibverbs/completion_queue.h"

#include <fcntl.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace kvxfer::ib {

Result<std::unique_ptr<CompletionQueue>> CompletionQueue::create(std::shared_ptr<Device> device,
                                                                 int entries) {
    const VerbsApi& v = device->verbs();
    std::unique_ptr<CompletionQueue> q(new CompletionQueue());
    q->device_ = device;
    q->channel_ = v.create_comp_channel(device->context());
    if (q->channel_ == nullptr)
        return Status::systemErrno("ibv_create_comp_channel on " + device->name(), errno);
    const int flags = ::fcntl(q->channel_->fd, F_GETFL);
    if (flags < 0 || ::fcntl(q->channel_->fd, F_SETFL, flags | O_NONBLOCK) != 0) {
        return Status::systemErrno("fcntl(O_NONBLOCK) on the completion channel", errno);
    }
    q->cq_ = v.create_cq(device->context(), entries, nullptr, q->channel_, 0);
    if (q->cq_ == nullptr) {
        return Status::systemErrno(
            "ibv_create_cq(" + std::to_string(entries) + " entries) on " + device->name(), errno);
    }
    return q;
}

CompletionQueue::~CompletionQueue() {
    const VerbsApi& v = device_->verbs();
    if (cq_ != nullptr) {
        drainEvents();
        v.destroy_cq(cq_);
    }
    if (channel_ != nullptr) v.destroy_comp_channel(channel_);
}

Status CompletionQueue::arm() {
    const int rc = ibv_req_notify_cq(cq_, 0);
    if (rc != 0) return Status::systemErrno("ibv_req_notify_cq", rc > 0 ? rc : errno);
    return Status::ok();
}

void CompletionQueue::drainEvents() {
    const VerbsApi& v = device_->verbs();
    unsigned n = 0;
    for (;;) {
        ibv_cq* cq = nullptr;
        void* ctx = nullptr;
        if (v.get_cq_event(channel_, &cq, &ctx) != 0) break;  // EAGAIN: none left
        ++n;
    }
    if (n > 0) v.ack_cq_events(cq_, n);
}

bool isRemoteFault(ibv_wc_status s) {
    return s == IBV_WC_REM_ACCESS_ERR || s == IBV_WC_REM_INV_REQ_ERR || s == IBV_WC_REM_OP_ERR ||
           s == IBV_WC_REM_INV_RD_REQ_ERR || s == IBV_WC_REM_ABORT_ERR;
}

bool isTransportFault(ibv_wc_status s) {
    return s == IBV_WC_RETRY_EXC_ERR || s == IBV_WC_RNR_RETRY_EXC_ERR || s == IBV_WC_RESP_TIMEOUT_ERR;
}

Status completionError(const VerbsApi& v, const ibv_wc& wc, const std::string& what) {
    char detail[96];
    std::snprintf(detail, sizeof(detail), " (wc status %d, vendor_err 0x%x, qp 0x%x)",
                  static_cast<int>(wc.status), wc.vendor_err, wc.qp_num);
    std::string msg = what + " failed: " + v.statusText(wc.status) + detail;
    if (wc.status == IBV_WC_REM_ACCESS_ERR) {
        msg +=
            ": the remote address range or rkey is not valid in the peer's registered memory "
            "(stale descriptor, deregistered region, or an extent outside the region)";
        return Status::remote(std::move(msg));
    }
    if (isRemoteFault(wc.status)) return Status::remote(std::move(msg));
    if (isTransportFault(wc.status)) {
        msg += ": the peer did not answer (process gone, port down or network unreachable)";
        return Status::peerUnreachable(std::move(msg));
    }
    return Status::system(std::move(msg));
}

}  // namespace kvxfer::ib
