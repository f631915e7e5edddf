#include "backends/ibverbs/work_request.h"

#include <algorithm>
#include <cstring>

namespace kvxfer::ib {

ibv_send_wr& PostList::append(ibv_wr_opcode opcode, uint64_t wr_id, uint64_t addr, uint32_t length,
                              uint32_t lkey, unsigned send_flags) {
    ibv_sge& sge = sges_[n_ * kMaxSge];
    sge.addr = addr;
    sge.length = length;
    sge.lkey = lkey;
    ibv_send_wr& wr = wrs_[n_++];
    std::memset(&wr, 0, sizeof(wr));
    wr.wr_id = wr_id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = opcode;
    wr.send_flags = send_flags;
    return wr;
}

void PostList::addRdma(ibv_wr_opcode opcode, uint64_t wr_id, uint64_t local_addr, uint32_t length,
                       uint32_t lkey, uint64_t remote_addr, uint32_t rkey, bool signaled) {
    ibv_send_wr& wr = append(opcode, wr_id, local_addr, length, lkey, signaled ? IBV_SEND_SIGNALED : 0);
    wr.wr.rdma.remote_addr = remote_addr;
    wr.wr.rdma.rkey = rkey;
}

void PostList::addSend(uint64_t wr_id, uint64_t addr, uint32_t length, uint32_t lkey, bool signaled,
                       bool inline_data) {
    append(IBV_WR_SEND, wr_id, addr, length, lkey,
           (signaled ? IBV_SEND_SIGNALED : 0) | (inline_data ? IBV_SEND_INLINE : 0));
}

void PostList::signalLast() {
    if (n_ > 0) wrs_[n_ - 1].send_flags |= IBV_SEND_SIGNALED;
}

ibv_send_wr* PostList::link() {
    for (size_t i = 0; i < n_; ++i) wrs_[i].next = i + 1 < n_ ? &wrs_[i + 1] : nullptr;
    return n_ ? &wrs_[0] : nullptr;
}

size_t PostList::indexOf(const ibv_send_wr* bad) const {
    for (size_t i = 0; i < n_; ++i) {
        if (&wrs_[i] == bad) return i;
    }
    return 0;  // unknown: assume nothing was posted
}

void* SendWindow::ownerOf(uint64_t seq) const {
    for (const auto& s : segments_) {
        if (seq >= s.first_seq && seq < s.first_seq + s.count) return s.owner;
    }
    return nullptr;
}

uint64_t SendWindow::record(void* owner, uint64_t first_unit, uint32_t count, uint32_t unsignaled_tail) {
    const uint64_t first = next_seq_;
    next_seq_ += count;
    in_flight_ += count;
    since_signal_ = unsignaled_tail;
    if (!segments_.empty()) {
        Segment& last = segments_.back();
        if (last.owner == owner && last.first_seq + last.count == first &&
            last.first_unit + last.count == first_unit) {
            last.count += count;
            return first;
        }
    }
    segments_.push_back({owner, first, first_unit, count});
    return first;
}

}  // namespace kvxfer::ib
