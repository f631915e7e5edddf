#include "backends/ibverbs/queue_pair.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>

namespace kvxfer::ib {
namespace {

uint32_t randomPsn() {
    static thread_local std::mt19937 rng{std::random_device{}()};
    return rng() & 0xffffff;
}

Status modifyError(const Device& d, const char* step, int rc) {
    const int err = rc > 0 ? rc : errno;
    return Status::systemErrno(std::string("ibv_modify_qp to ") + step + " on " + d.name(), err);
}

}  // namespace

void fillAddress(const Device& d, const ibv_gid& gid, uint16_t lid, uint8_t traffic_class, uint8_t sl,
                 uint8_t hop_limit, ibv_ah_attr* a) {
    std::memset(a, 0, sizeof(*a));
    a->port_num = d.port();
    a->sl = sl;
    a->dlid = lid;
    // RoCE needs the GRH; on InfiniBand it is harmless within a subnet and needed across.
    if (d.ethernet() || !gidIsZero(gid)) {
        a->is_global = 1;
        a->grh.dgid = gid;
        a->grh.sgid_index = static_cast<uint8_t>(d.gidIndex());
        a->grh.hop_limit = hop_limit;
        a->grh.traffic_class = traffic_class;
    }
}

// ---- SharedReceiveQueue ---------------------------------------------------------------

Result<std::unique_ptr<SharedReceiveQueue>> SharedReceiveQueue::create(std::shared_ptr<Device> device,
                                                                       uint32_t max_wr) {
    std::unique_ptr<SharedReceiveQueue> q(new SharedReceiveQueue());
    q->device_ = device;
    ibv_srq_init_attr attr{};
    attr.attr.max_wr = max_wr;
    attr.attr.max_sge = 1;
    q->srq_ = device->verbs().create_srq(device->pd(), &attr);
    if (q->srq_ == nullptr) return Status::systemErrno("ibv_create_srq on " + device->name(), errno);
    return q;
}

SharedReceiveQueue::~SharedReceiveQueue() {
    if (srq_ != nullptr) device_->verbs().destroy_srq(srq_);
}

Status SharedReceiveQueue::post(uint64_t wr_id, void* addr, uint32_t length, uint32_t lkey) {
    ibv_sge sge{reinterpret_cast<uint64_t>(addr), length, lkey};
    ibv_recv_wr wr{};
    wr.wr_id = wr_id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    ibv_recv_wr* bad = nullptr;
    const int rc = ibv_post_srq_recv(srq_, &wr, &bad);
    if (rc != 0) return Status::systemErrno("ibv_post_srq_recv", rc > 0 ? rc : errno);
    return Status::ok();
}

// ---- QueuePair ----------------------------------------------------------------------------

Result<std::unique_ptr<QueuePair>> QueuePair::createRc(std::shared_ptr<Device> device, ibv_cq* cq,
                                                       ibv_srq* srq, const RcCaps& caps) {
    std::unique_ptr<QueuePair> q(new QueuePair());
    q->device_ = device;
    ibv_qp_init_attr attr{};
    attr.send_cq = cq;
    attr.recv_cq = cq;
    attr.srq = srq;
    attr.qp_type = IBV_QPT_RC;
    attr.sq_sig_all = 0;
    attr.cap.max_send_wr = caps.send_depth;
    attr.cap.max_recv_wr = srq ? 0 : 1;
    attr.cap.max_send_sge = caps.max_send_sge;
    attr.cap.max_recv_sge = srq ? 0 : 1;
    attr.cap.max_inline_data = caps.max_inline;
    const VerbsApi& v = device->verbs();
    q->qp_ = v.create_qp(device->pd(), &attr);
    if (q->qp_ == nullptr && caps.max_inline > 0) {
        attr.cap.max_inline_data = 0;  // some providers refuse inline data: go without
        q->qp_ = v.create_qp(device->pd(), &attr);
    }
    if (q->qp_ == nullptr) {
        return Status::systemErrno(
            "ibv_create_qp(RC, " + std::to_string(caps.send_depth) + " send WRs) on " + device->name(),
            errno);
    }
    q->send_depth_ = std::min(attr.cap.max_send_wr, caps.send_depth);
    q->max_inline_ = attr.cap.max_inline_data;
    q->psn_ = randomPsn();
    return q;
}

Result<std::unique_ptr<QueuePair>> QueuePair::createUd(std::shared_ptr<Device> device, ibv_cq* cq,
                                                       uint32_t send_depth, uint32_t recv_depth,
                                                       uint32_t qkey) {
    std::unique_ptr<QueuePair> q(new QueuePair());
    q->device_ = device;
    ibv_qp_init_attr attr{};
    attr.send_cq = cq;
    attr.recv_cq = cq;
    attr.qp_type = IBV_QPT_UD;
    attr.cap.max_send_wr = send_depth;
    attr.cap.max_recv_wr = recv_depth;
    attr.cap.max_send_sge = 1;
    attr.cap.max_recv_sge = 1;
    const VerbsApi& v = device->verbs();
    q->qp_ = v.create_qp(device->pd(), &attr);
    if (q->qp_ == nullptr) return Status::systemErrno("ibv_create_qp(UD) on " + device->name(), errno);
    q->send_depth_ = send_depth;
    q->psn_ = randomPsn();

    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_INIT;
    a.pkey_index = 0;
    a.port_num = device->port();
    a.qkey = qkey;
    int rc = v.modify_qp(q->qp_, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_QKEY);
    if (rc != 0) return modifyError(*device, "INIT (UD)", rc);
    std::memset(&a, 0, sizeof(a));
    a.qp_state = IBV_QPS_RTR;
    rc = v.modify_qp(q->qp_, &a, IBV_QP_STATE);
    if (rc != 0) return modifyError(*device, "RTR (UD)", rc);
    std::memset(&a, 0, sizeof(a));
    a.qp_state = IBV_QPS_RTS;
    a.sq_psn = q->psn_;
    rc = v.modify_qp(q->qp_, &a, IBV_QP_STATE | IBV_QP_SQ_PSN);
    if (rc != 0) return modifyError(*device, "RTS (UD)", rc);
    return q;
}

QueuePair::~QueuePair() {
    if (qp_ != nullptr) device_->verbs().destroy_qp(qp_);
}

Status QueuePair::toInit(int remote_access) {
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_INIT;
    a.pkey_index = 0;
    a.port_num = device_->port();
    a.qp_access_flags = remote_access;
    const int rc = device_->verbs().modify_qp(
        qp_, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
    return rc == 0 ? Status::ok() : modifyError(*device_, "INIT", rc);
}

Status QueuePair::toRtr(const RcPath& p) {
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_RTR;
    a.path_mtu = p.mtu;
    a.dest_qp_num = p.remote_qpn;
    a.rq_psn = p.remote_psn;
    a.max_dest_rd_atomic = p.max_dest_rd_atomic;
    a.min_rnr_timer = p.min_rnr_timer;
    fillAddress(*device_, p.remote_gid, p.remote_lid, p.traffic_class, p.service_level, p.hop_limit,
                &a.ah_attr);
    const int rc =
        device_->verbs().modify_qp(qp_, &a,
                                   IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                                       IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
    return rc == 0 ? Status::ok() : modifyError(*device_, "RTR", rc);
}

Status QueuePair::toRts(const RcTiming& t) {
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_RTS;
    a.timeout = t.timeout;
    a.retry_cnt = t.retry_cnt;
    a.rnr_retry = t.rnr_retry;
    a.sq_psn = psn_;
    a.max_rd_atomic = t.max_rd_atomic;
    const int rc = device_->verbs().modify_qp(qp_, &a,
                                              IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                                                  IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC);
    return rc == 0 ? Status::ok() : modifyError(*device_, "RTS", rc);
}

Status QueuePair::toError() {
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_ERR;
    const int rc = device_->verbs().modify_qp(qp_, &a, IBV_QP_STATE);
    return rc == 0 ? Status::ok() : modifyError(*device_, "ERR", rc);
}

Status QueuePair::post(ibv_send_wr* wr, ibv_send_wr** bad) {
    const int rc = ibv_post_send(qp_, wr, bad);
    if (rc != 0)
        return Status::systemErrno("ibv_post_send on QP " + std::to_string(qpn()), rc > 0 ? rc : errno);
    return Status::ok();
}

Status QueuePair::postRecv(uint64_t wr_id, void* addr, uint32_t length, uint32_t lkey) {
    ibv_sge sge{reinterpret_cast<uint64_t>(addr), length, lkey};
    ibv_recv_wr wr{};
    wr.wr_id = wr_id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    ibv_recv_wr* bad = nullptr;
    const int rc = ibv_post_recv(qp_, &wr, &bad);
    if (rc != 0) return Status::systemErrno("ibv_post_recv", rc > 0 ? rc : errno);
    return Status::ok();
}

// ---- AddressHandle ----------------------------------------------------------------------

Result<std::unique_ptr<AddressHandle>> AddressHandle::create(std::shared_ptr<Device> device,
                                                             const ibv_gid& gid, uint16_t lid) {
    std::unique_ptr<AddressHandle> h(new AddressHandle());
    h->device_ = device;
    ibv_ah_attr attr;
    fillAddress(*device, gid, lid, 0, 0, 64, &attr);
    h->ah_ = device->verbs().create_ah(device->pd(), &attr);
    if (h->ah_ == nullptr) {
        return Status::systemErrno("ibv_create_ah to " + gidToString(gid) + " on " + device->name(), errno);
    }
    return h;
}

AddressHandle::~AddressHandle() {
    if (ah_ != nullptr) device_->verbs().destroy_ah(ah_);
}

}  // namespace kvxfer::ib
