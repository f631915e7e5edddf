// The cuda_ipc backend's notification channel: the authenticated same-host notification
// socket of util/notify_socket.h (one implementation with shm: SO_PEERCRED, an HMAC
// challenge over the descriptor's secret both ways, notifications attributed to the
// proven peer, back-pressure by not reading a peer whose notification the sink refused).
// This file adds only the cuda_ipc protocol constants and a sender with a deadline.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "kvxfer/backend.h"
#include "util/notify_socket.h"
#include "util/scoped_fd.h"

namespace kvxfer::cudaipc {

// Labels "kvxfer-cuda_ipc-target\0" / "kvxfer-cuda_ipc-initiator\0"; magic "KVC1".
const notify_socket::Protocol& notifyProtocol();

using NotifyListener = notify_socket::Listener;

class NotifySender {
public:
    // Connects to the listener `name` of `peer` and proves its secret by `deadline`.
    static Result<std::unique_ptr<NotifySender>> connect(const std::string& name, const PeerIdentity& peer,
                                                         const std::string& self_name, uint64_t self_instance,
                                                         Clock::time_point deadline);
    // kTimeout at `deadline` if the peer's socket stays full (stopped, or its application
    // is not taking notifications and its engine's queue is full).
    Status send(ByteView payload, Clock::time_point deadline);

private:
    std::mutex mutex_;
    Fd fd_;
    std::string peer_name_;
};

}  // namespace kvxfer::cudaipc
