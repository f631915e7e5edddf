// The cuda_ipc backend's notification channel: the authenticated same-host notification
// socket of util/notify_socket.h (one implementation with shm: SO_PEERCRED, an HMAC
// challenge over the descriptor's secret both ways, notifications attributed to the
// proven peer, back-pressure by not reading a peer whose notification the sink refused,
// and sends that never block the sending thread: a full peer socket queues them to the
// backend's Notifier, which ends them at their deadlines). This file adds only the
// cuda_ipc protocol constants and the connect call.
#pragma once

#include <memory>
#include <string>

#include "kvxfer/backend.h"
#include "util/notify_socket.h"

namespace kvxfer::cudaipc {

// Labels "kvxfer-cuda_ipc-target\0" / "kvxfer-cuda_ipc-initiator\0"; magic "KVC1".
const notify_socket::Protocol& notifyProtocol();

using NotifyListener = notify_socket::Listener;
using NotifySender = notify_socket::Sender;

// Connects to the listener `name` of `peer` and proves its secret by `deadline`.
Result<std::shared_ptr<NotifySender>> connectSender(const std::string& name, const PeerIdentity& peer,
                                                    const std::string& self_name, uint64_t self_instance,
                                                    Clock::time_point deadline,
                                                    std::shared_ptr<notify_socket::Notifier> notifier);

}  // namespace kvxfer::cudaipc
