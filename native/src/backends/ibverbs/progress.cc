// ibverbs backend: the progress thread's loop (drain commands, poll the CQ, post, run the
// handshake timers, then spin briefly and sleep on the CQ channel, the wake eventfd and the
// async event fd), the commands other threads queue, and the device's async events.
#include <poll.h>
#include <unistd.h>

#include <thread>

#include "backends/ibverbs/shared.h"

namespace kvxfer::ib {

// ================================================================================================
// progress loop

void Shared::run() {
    std::vector<pollfd> fds(3);
    for (;;) {
        graveyard_.clear();  // releases finished jobs
        if (stop_.load(std::memory_order_acquire)) break;
        drainCommands();
        if (room_.exchange(false, std::memory_order_acq_rel)) {
            room_armed_ = false;
            deliverHeld();
        }
        int found = pollCompletions();
        postWork();
        const auto now = Clock::now();
        handshakeTimers(now);
        // Cancellation is pushed (Backend::cancel -> kCancel); released connections are
        // checked while any drain.
        if (sweep_requested_ || !closing_.empty()) {
            sweep_requested_ = false;
            sweepAbandoned();
        }
        if (found > 0) continue;

        // Idle. Release finished jobs before waiting: they keep their engine alive (and so
        // the device open) for as long as they sit here.
        graveyard_.clear();
        if (stop_.load(std::memory_order_acquire)) break;
        // Spin briefly, then arm the CQ and sleep on its channel.
        if (t_.spin_us > 0) {
            const auto spin_until = Clock::now() + std::chrono::microseconds(t_.spin_us);
            while (Clock::now() < spin_until && found == 0) {
                found = pollCompletions();
                std::lock_guard<std::mutex> lock(mutex_);
                if (!commands_.empty()) break;
            }
            if (found > 0) continue;
        }
        if (!cq_->arm().isOk()) {
            std::this_thread::sleep_for(1ms);
            continue;
        }
        if (pollCompletions() > 0) continue;
        int timeout_ms = 1000;  // nothing should need it, but never sleep unboundedly
        for (auto& [id, conn] : initiated_) {
            if (!conn->handshaking) continue;
            const auto next = std::min(conn->handshake_next, conn->handshake_deadline);
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(next - now);
            const int ms = static_cast<int>(std::clamp<int64_t>(left.count() + 1, 1, 1000));
            timeout_ms = std::min(timeout_ms, ms);
        }
        if (!closing_.empty()) timeout_ms = std::min(timeout_ms, 50);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (!commands_.empty() || stop_.load()) continue;
            sleeping_ = true;
        }
        fds[0] = {cq_->fd(), POLLIN, 0};
        fds[1] = {wake_fd_, POLLIN, 0};
        fds[2] = {device_->context()->async_fd, POLLIN, 0};
        const int n = ::poll(fds.data(), fds.size(), timeout_ms);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            sleeping_ = false;
        }
        if (n > 0) {
            if (fds[0].revents) cq_->drainEvents();
            if (fds[1].revents) {
                uint64_t v;
                (void)!::read(wake_fd_, &v, sizeof(v));
            }
            if (fds[2].revents) onAsyncEvents();
        }
    }
    // Shutdown: tell peers we initiated to drop their side, give the datagrams a moment.
    for (auto& [id, conn] : initiated_) {
        if (conn->state == ConnState::kReady) {
            CmMessage m;
            m.type = CmType::kDisconnect;
            m.conn_id = conn->id;
            m.src_instance = instance_;
            m.dst_instance = conn->peer_instance;
            sendCm(m, conn->remote.gid, conn->remote.lid, conn->remote.ud_qpn, conn->remote.qkey);
        }
    }
    const auto until = Clock::now() + 20ms;
    while (free_ud_send_.size() < kUdSendSlots && Clock::now() < until) {
        if (pollCompletions() == 0) std::this_thread::sleep_for(100us);
    }
    teardownConnections();
    // Anything still tracked (standalone notifications) ends now; its QP is gone.
    while (!works_.empty()) finishWork(*works_.front(), Status::canceled("ibverbs backend shut down"));
    // Commands queued before the stop and never drained: their jobs and waiters end here
    // (nothing of them was posted to the device).
    std::vector<Command> left;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        left.swap(commands_);
    }
    for (auto& c : left) {
        if (c.job) c.job->dataDone(Status::canceled("ibverbs backend shut down"), false);
        if (c.waiter) c.waiter->set(Status::canceled("ibverbs backend shut down"));
    }
    left.clear();
    graveyard_.clear();
}

void Shared::drainCommands() {
    std::vector<Command> cmds;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        cmds.swap(commands_);
    }
    for (auto& c : cmds) {
        switch (c.kind) {
            case Command::Kind::kSubmit:
                admitJob(c);
                break;
            case Command::Kind::kNotify:
                admitNotify(c);
                break;
            case Command::Kind::kConnect:
                startConnect(c);
                break;
            case Command::Kind::kAbortConnect:
                abortConnect(c.conn);
                break;
            case Command::Kind::kRelease:
                release(c.conn);
                break;
            case Command::Kind::kCancel:
                sweep_requested_ = true;
                break;
        }
    }
}

void Shared::onAsyncEvents() {
    for (;;) {
        ibv_async_event ev{};
        if (verbs_.get_async_event(device_->context(), &ev) != 0) return;
        const ibv_event_type type = ev.event_type;
        const bool our_port = ev.element.port_num == device_->port();
        verbs_.ack_async_event(&ev);
        switch (type) {
            case IBV_EVENT_DEVICE_FATAL:
            case IBV_EVENT_CQ_ERR: {
                Status st = Status::system("ibverbs: " + std::string(verbs_.eventText(type)) + " on " +
                                           device_->name() + "; the backend cannot move data any more");
                {
                    std::lock_guard<std::mutex> lock(mutex_);
                    device_dead_status_ = st;
                }
                device_dead_.store(true);
                failEverything(st);
                break;
            }
            case IBV_EVENT_PORT_ERR:
                if (our_port) port_down_.store(true);
                break;
            case IBV_EVENT_PORT_ACTIVE:
                if (our_port) port_down_.store(false);
                break;
            default:
                break;  // QP events surface as completions; the rest needs no action
        }
    }
}

}  // namespace kvxfer::ib
