// The cuda_ipc backend's notification channel: a SOCK_SEQPACKET Unix socket in the
// abstract namespace per engine (one message = one notification), and one connected
// socket per peer. A message is u64 sender instance | u16 name length | name | payload.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "kvxfer/backend.h"
#include "util/scoped_fd.h"

namespace kvxfer::cudaipc {

// Receives notifications and hands them to the sink; its thread holds only this state.
class NotifyListener {
public:
    static Result<std::shared_ptr<NotifyListener>> start(NotificationSink* sink, const std::string& name);
    void stop();  // idempotent; joins the thread unless called from it
    const std::string& name() const { return name_; }

private:
    void run();
    NotificationSink* sink_ = nullptr;
    std::string name_;
    Fd listen_fd_, stop_fd_, epoll_fd_;
    std::thread thread_;
};

class NotifySender {
public:
    // Connects to the listener `name` of peer `peer_name`.
    static Result<std::unique_ptr<NotifySender>> connect(const std::string& name,
                                                         const std::string& peer_name,
                                                         const std::string& self_name,
                                                         uint64_t self_instance);
    Status send(ByteView payload);

private:
    std::mutex mutex_;
    Fd fd_;
    std::string peer_name_, self_name_;
    uint64_t self_instance_ = 0;
};

}  // namespace kvxfer::cudaipc
