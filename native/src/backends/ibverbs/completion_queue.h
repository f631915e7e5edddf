// completion_queue: the backend's one CQ with its completion channel, and the mapping of
// work completions to kvxfer Status.
//
// The progress thread drains the CQ in batches; when it finds nothing for a short spin it
// arms the CQ (ibv_req_notify_cq), polls once more to close the race, and sleeps in
// poll(2) on the channel's fd (plus a wake-up eventfd and the device's async fd). So an
// idle backend costs no CPU, and a busy one never sleeps.
//
// wr_id encoding (every WR this backend posts): the top 8 bits say what it is, the rest
// identify it, so error completions (whose opcode is undefined) are still attributable.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "backends/ibverbs/device.h"

namespace kvxfer::ib {

enum class WrKind : uint8_t {
    kRcSend = 1,   // RDMA WRITE / READ / SEND on an RC QP; low bits: the QP's sequence number
    kSrqRecv = 2,  // a receive buffer on the SRQ; low bits: buffer index
    kUdRecv = 3,   // a receive buffer on the UD QP; low bits: buffer index
    kUdSend = 4,   // a connection-manager datagram; low bits: send slot index
};
inline uint64_t makeWrId(WrKind kind, uint64_t value) {
    return (static_cast<uint64_t>(kind) << 56) | (value & ((uint64_t{1} << 56) - 1));
}
inline WrKind wrKind(uint64_t wr_id) { return static_cast<WrKind>(wr_id >> 56); }
inline uint64_t wrValue(uint64_t wr_id) { return wr_id & ((uint64_t{1} << 56) - 1); }

class CompletionQueue {
public:
    static Result<std::unique_ptr<CompletionQueue>> create(std::shared_ptr<Device> device, int entries);
    ~CompletionQueue();
    CompletionQueue(const CompletionQueue&) = delete;
    CompletionQueue& operator=(const CompletionQueue&) = delete;

    ibv_cq* cq() const { return cq_; }
    int entries() const { return cq_->cqe; }
    int fd() const { return channel_->fd; }  // readable after an armed CQ got a completion

    int poll(ibv_wc* wc, int n) { return ibv_poll_cq(cq_, n, wc); }
    // Requests an event for the next completion; poll again afterwards before sleeping.
    Status arm();
    // Consumes pending channel events (non-blocking) and acknowledges them.
    void drainEvents();

private:
    CompletionQueue() = default;
    std::shared_ptr<Device> device_;
    ibv_comp_channel* channel_ = nullptr;
    ibv_cq* cq_ = nullptr;
};

// The Status of a failed work completion: kRemote for errors the responder reported
// (access, invalid request, operation), kPeerUnreachable for transport errors (retries
// exhausted, no response), kSystem for everything else. The message names the WC status
// (ibv_wc_status_str), its number and the vendor syndrome.
Status completionError(const VerbsApi& verbs, const ibv_wc& wc, const std::string& what);
bool isRemoteFault(ibv_wc_status status);
bool isTransportFault(ibv_wc_status status);

}  // namespace kvxfer::ib
