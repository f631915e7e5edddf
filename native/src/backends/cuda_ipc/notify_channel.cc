#include "backends/cuda_ipc/notify_channel.h"

namespace kvxfer::cudaipc {

const notify_socket::Protocol& notifyProtocol() {
    static const notify_socket::Protocol p{"cuda_ipc", 0x3143564b};  // "KVC1"
    return p;
}

Result<std::unique_ptr<NotifySender>> NotifySender::connect(const std::string& name, const PeerIdentity& peer,
                                                            const std::string& self_name,
                                                            uint64_t self_instance,
                                                            Clock::time_point deadline) {
    auto s = std::make_unique<NotifySender>();
    s->peer_name_ = peer.name;
    KVXFER_ASSIGN_OR_RETURN(
        s->fd_, notify_socket::connect(notifyProtocol(), name, peer, self_instance, self_name, deadline));
    return s;
}

Status NotifySender::send(ByteView payload, Clock::time_point deadline) {
    if (payload.size() + 1 > notify_socket::kMaxMessage) {
        return Status::invalidArgument("notification of " + std::to_string(payload.size()) +
                                       " bytes is too long");
    }
    const Bytes msg = notify_socket::notificationMessage(payload);
    std::lock_guard<std::mutex> lock(mutex_);
    return notify_socket::sendBy(fd_.fd, msg, notifyProtocol(), peer_name_, deadline);
}

}  // namespace kvxfer::cudaipc
