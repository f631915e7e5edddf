#include "backends/cuda_ipc/notify_channel.h"

namespace kvxfer::cudaipc {

const notify_socket::Protocol& notifyProtocol() {
    static const notify_socket::Protocol p{"cuda_ipc", 0x3143564b};  // "KVC1"
    return p;
}

Result<std::shared_ptr<NotifySender>> connectSender(const std::string& name, const PeerIdentity& peer,
                                                    const std::string& self_name, uint64_t self_instance,
                                                    Clock::time_point deadline,
                                                    std::shared_ptr<notify_socket::Notifier> notifier) {
    KVXFER_ASSIGN_OR_RETURN(
        Fd fd, notify_socket::connect(notifyProtocol(), name, peer, self_instance, self_name, deadline));
    return std::make_shared<NotifySender>(notifyProtocol(), peer.name, std::move(fd), std::move(notifier));
}

}  // namespace kvxfer::cudaipc
