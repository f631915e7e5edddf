// work_request: post lists and the per-QP send window.
//
// PostList builds one chain of linked ibv_send_wr (each with its own SGE list) so that a
// single ibv_post_send hands many work requests to the NIC: one doorbell per chain.
//
// SendWindow is the flow control and bookkeeping of one RC QP's send queue:
// - at most `depth` WRs are outstanding (posted, not yet known complete);
// - WRs get consecutive sequence numbers (the low bits of their wr_id);
// - signaling is selective: every `signal_interval`-th WR and the last WR of each chain
//   are signaled, so the tail of the send queue is always signaled and a completion
//   for sequence S retires every WR up to S (RC completes in order);
// - every run of WRs posted for one owner is a Segment, so retiring a sequence number
//   tells which owners' WRs finished and which work units (plan runs) they carried.
#pragma once

#include <infiniband/verbs.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <deque>

namespace kvxfer::ib {

class PostList {
public:
    static constexpr size_t kMaxWrs = 64;
    static constexpr size_t kMaxSge = 2;

    void clear() { n_ = 0; }
    size_t size() const { return n_; }
    bool full() const { return n_ == kMaxWrs; }

    void addRdma(ibv_wr_opcode opcode, uint64_t wr_id, uint64_t local_addr, uint32_t length, uint32_t lkey,
                 uint64_t remote_addr, uint32_t rkey, bool signaled);
    void addSend(uint64_t wr_id, uint64_t addr, uint32_t length, uint32_t lkey, bool signaled,
                 bool inline_data);
    // Marks the last WR signaled (every chain ends signaled).
    void signalLast();
    bool signaled(size_t i) const { return (wrs_[i].send_flags & IBV_SEND_SIGNALED) != 0; }
    // Links the WRs and returns the head (valid until the next add/clear).
    ibv_send_wr* link();
    // How many WRs of the chain precede `bad` (as reported by a failed ibv_post_send).
    size_t indexOf(const ibv_send_wr* bad) const;

private:
    // Fills the next WR and its single SGE; the caller adds opcode-specific fields.
    ibv_send_wr& append(ibv_wr_opcode opcode, uint64_t wr_id, uint64_t addr, uint32_t length, uint32_t lkey,
                        unsigned send_flags);
    std::array<ibv_send_wr, kMaxWrs> wrs_{};
    std::array<ibv_sge, kMaxWrs * kMaxSge> sges_{};
    size_t n_ = 0;
};

class SendWindow {
public:
    struct Segment {
        void* owner;
        uint64_t first_seq;
        uint64_t first_unit;
        uint32_t count;
    };

    SendWindow(uint32_t depth, uint32_t signal_interval) : depth_(depth), interval_(signal_interval) {}

    uint32_t depth() const { return depth_; }
    uint32_t inFlight() const { return in_flight_; }
    uint32_t room() const { return depth_ - in_flight_; }
    bool empty() const { return in_flight_ == 0; }
    uint64_t nextSeq() const { return next_seq_; }
    // True when `seq` is outstanding (guards against stale or foreign completions).
    bool contains(uint64_t seq) const { return in_flight_ > 0 && seq >= oldest() && seq < next_seq_; }
    uint64_t oldest() const { return segments_.empty() ? next_seq_ : segments_.front().first_seq; }
    // The owner of outstanding sequence `seq` (must be contained).
    void* ownerOf(uint64_t seq) const;

    // Whether the WR about to take sequence nextSeq() + offset should be signaled.
    bool wantSignal(uint32_t offset_in_chain) const {
        return (since_signal_ + offset_in_chain + 1) % interval_ == 0;
    }
    // Records `count` WRs just posted for `owner` carrying units [first_unit, +count);
    // `unsignaled_tail` = how many WRs follow the chain's last signaled one (0 when the
    // chain ends signaled, as every chain of this backend does).
    uint64_t record(void* owner, uint64_t first_unit, uint32_t count, uint32_t unsignaled_tail);

    // Retires every outstanding WR with sequence <= `upto`; calls
    // fn(owner, first_unit, count) for each retired piece, oldest first.
    template <typename Fn>
    void retire(uint64_t upto, Fn&& fn) {
        while (!segments_.empty() && segments_.front().first_seq <= upto) {
            Segment& s = segments_.front();
            const uint64_t n64 = std::min<uint64_t>(s.count, upto - s.first_seq + 1);
            const uint32_t n = static_cast<uint32_t>(n64);
            void* owner = s.owner;
            const uint64_t unit = s.first_unit;
            in_flight_ -= n;
            if (n == s.count) {
                segments_.pop_front();
            } else {
                s.first_seq += n;
                s.first_unit += n;
                s.count -= n;
            }
            fn(owner, unit, n);
        }
    }
    // Forgets everything (the QP was replaced); returns nothing to anybody.
    void reset() {
        segments_.clear();
        in_flight_ = 0;
        since_signal_ = 0;
    }

private:
    uint32_t depth_;
    uint32_t interval_;
    uint32_t in_flight_ = 0;
    uint32_t since_signal_ = 0;
    uint64_t next_seq_ = 1;
    std::deque<Segment> segments_;
};

}  // namespace kvxfer::ib
