// TCP backend, target side: the listener thread and the serving of one inbound connection
// (HELLO handshake, WRITE / END / READ_REQ / NOTIFY frames checked against the region table),
// and the fencing of an initiator's older connections when it reconnects.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <unordered_map>

#include "backends/tcp/tcp_internal.h"

namespace kvxfer::tcp {

// Registers a new connection of `initiator`, fencing off its older ones.
std::shared_ptr<InboundFence> Shared::newFence(uint64_t initiator) {
    auto fence = std::make_shared<InboundFence>();
    std::vector<std::shared_ptr<InboundFence>> older;
    {
        std::lock_guard<std::mutex> lock(fence_mutex);
        for (auto it = fences.begin(); it != fences.end();) {
            auto f = it->second.lock();
            if (!f) {
                it = fences.erase(it);
                continue;
            }
            if (it->first == initiator) older.push_back(std::move(f));
            ++it;
        }
        fences.emplace(initiator, fence);
    }
    for (auto& f : older) {
        f->superseded.store(true);
        // A section in progress ends within one poll slice once it sees `superseded`.
        std::lock_guard<std::mutex> wait_out(f->section);
    }
    return fence;
}

namespace {

class InboundConnection {
public:
    InboundConnection(Shared& shared, int fd) : sh_(shared), fd_(fd), scratch_(kScratchBytes) {}

    void serve() {
        if (!handshake().isOk()) return;
        uint8_t hb[kHeaderBytes];
        for (;;) {
            if (!recvBytes(fd_, hb, sizeof(hb), stopCheck(), "tcp target").isOk()) return;
            Header h;
            if (!decodeHeader(hb, &h)) return;      // malformed: close
            if (fence_->superseded.load()) return;  // the initiator reconnected: stale stream
            bool ok = false;
            switch (h.type) {
                case kWrite:
                    ok = onWrite(h);
                    break;
                case kEnd:
                    ok = onEnd(h);
                    break;
                case kReadReq:
                    ok = onReadReq(h);
                    break;
                case kNotify:
                    ok = onNotify(h);
                    break;
                default:
                    ok = false;
            }
            if (!ok) return;
        }
    }

private:
    struct StopCheck {
        const Shared* sh;
        const InboundFence* fence;
        Status operator()(bool) const {
            if (sh->stopping.load()) return Status::canceled("tcp backend is closing");
            if (fence && fence->superseded.load())
                return Status::canceled("tcp: superseded by a newer connection");
            return Status::ok();
        }
    };
    StopCheck stopCheck() const { return {&sh_, fence_.get()}; }

    Status reply(const Header& h, const std::string& body = {}) {
        out_.clear();
        appendFrame(out_, h, body.data(), body.size());
        return sendBytes(fd_, out_.data(), out_.size(), stopCheck(), "tcp target reply");
    }

    Status handshake() {
        const auto deadline = Clock::now() + kHandshakeTimeout;
        auto check = [&](bool) {
            if (sh_.stopping.load()) return Status::canceled("tcp backend is closing");
            if (Clock::now() >= deadline) return Status::timeout("tcp: no HELLO from the connecting peer");
            return Status::ok();
        };
        uint8_t hb[kHeaderBytes];
        KVXFER_RETURN_IF_ERROR(recvBytes(fd_, hb, sizeof(hb), check, "tcp hello"));
        Header h;
        if (!decodeHeader(hb, &h) || h.type != kHello || h.aux == 0 || h.aux > kMaxNameBytes) {
            return Status::remote("malformed HELLO");
        }
        peer_name_.resize(h.aux);
        KVXFER_RETURN_IF_ERROR(recvBytes(fd_, peer_name_.data(), peer_name_.size(), check, "tcp hello"));
        peer_instance_ = h.job;
        Header ack{.type = kHelloAck, .job = sh_.instance};
        if (h.a != sh_.instance) {
            const std::string msg = "engine '" + sh_.name + "' listening here is another instance (" +
                                    std::to_string(sh_.instance) + ", not " + std::to_string(h.a) +
                                    "): the peer restarted";
            ack.aux = static_cast<uint32_t>(StatusCode::kPeerUnreachable);
            ack.b = msg.size();
            (void)reply(ack, msg);
            return Status::peerUnreachable(msg);
        }
        fence_ = sh_.newFence(peer_instance_);
        return reply(ack);
    }

    // Reads and checks a run table of `n` runs totalling `bytes`. False: malformed.
    bool readTable(const Header& h) {
        const uint32_t n = h.aux;
        if (n == 0 || n > kMaxBatchRuns || h.b > kMaxBatchBytes) return false;
        table_.resize(static_cast<size_t>(n) * 16);
        if (!recvBytes(fd_, table_.data(), table_.size(), stopCheck(), "tcp target").isOk()) return false;
        uint64_t sum = 0;
        for (uint32_t i = 0; i < n; ++i) {
            const uint64_t len = getLe(table_.data() + 16 * i + 8, 8);
            if (len == 0 || len > kMaxRunBytes) return false;
            sum += len;
        }
        return sum == h.b;
    }
    uint64_t runAddr(uint32_t i) const { return getLe(table_.data() + 16 * i, 8); }
    uint64_t runLen(uint32_t i) const { return getLe(table_.data() + 16 * i + 8, 8); }

    bool discard(uint64_t n) {
        while (n > 0) {
            const size_t step = static_cast<size_t>(std::min<uint64_t>(n, scratch_.size()));
            if (!recvBytes(fd_, scratch_.data(), step, stopCheck(), "tcp target").isOk()) return false;
            n -= step;
        }
        return true;
    }

    void failJob(uint64_t job, Status st) { failed_.emplace(job, std::move(st)); }

    bool onWrite(const Header& h) {
        if (!readTable(h)) return false;
        if (failed_.size() > 65536) return false;       // a peer that never sends END
        if (failed_.count(h.job)) return discard(h.b);  // already failed: drop the rest
        Pins pins(sh_.regions);
        for (uint32_t i = 0; i < h.aux; ++i) {
            if (!pins.pin(runAddr(i), runLen(i))) {
                pins.release();
                char buf[160];
                std::snprintf(
                    buf, sizeof(buf), "range [0x%llx, +%llu) is outside every region registered with '",
                    static_cast<unsigned long long>(runAddr(i)), static_cast<unsigned long long>(runLen(i)));
                failJob(h.job, Status::remote("tcp peer: write to " + std::string(buf) + sh_.name + "'"));
                return discard(h.b);
            }
        }
        std::unique_lock<std::mutex> section(fence_->section);
        if (fence_->superseded.load()) return false;
        IovCursor cur;
        for (uint32_t i = 0; i < h.aux; ++i) cur.add(reinterpret_cast<void*>(runAddr(i)), runLen(i));
        bool region_gone = false;
        auto check = [&](bool) {
            if (sh_.stopping.load()) return Status::canceled("tcp backend is closing");
            if (fence_->superseded.load()) return Status::canceled("tcp: superseded by a newer connection");
            if (!pins.alive()) {
                region_gone = true;
                return Status::remote("tcp peer: a destination region of '" + sh_.name +
                                      "' was deregistered during the transfer");
            }
            return Status::ok();
        };
        Status st = moveAll(fd_, false, cur, check, "tcp target");
        if (st.isOk()) return true;
        if (!region_gone) return false;
        section.unlock();
        pins.release();
        failJob(h.job, st);
        return discard(cur.remaining());
    }

    bool onEnd(const Header& h) {
        if (h.b > kMaxNotifyBytes) return false;
        Bytes payload(h.b);
        if (!recvBytes(fd_, payload.data(), payload.size(), stopCheck(), "tcp target").isOk()) return false;
        Status st;
        if (auto it = failed_.find(h.job); it != failed_.end()) {
            st = std::move(it->second);
            failed_.erase(it);
        }
        if (h.aux & kEndAbort) return true;
        if (st.isOk() && (h.aux & kEndNotify))
            sh_.sink->deliver(peer_name_, peer_instance_, std::move(payload));
        const std::string& msg = st.message();
        return reply({.type = kAck, .aux = static_cast<uint32_t>(st.code()), .job = h.job, .b = msg.size()},
                     msg)
            .isOk();
    }

    bool onReadReq(const Header& h) {
        if (!readTable(h)) return false;
        Pins pins(sh_.regions);
        for (uint32_t i = 0; i < h.aux; ++i) {
            if (!pins.pin(runAddr(i), runLen(i))) {
                char buf[160];
                std::snprintf(buf, sizeof(buf),
                              "tcp peer: read of [0x%llx, +%llu) is outside every region registered with '",
                              static_cast<unsigned long long>(runAddr(i)),
                              static_cast<unsigned long long>(runLen(i)));
                const std::string msg = buf + sh_.name + "'";
                return reply({.type = kReadData,
                              .aux = static_cast<uint32_t>(StatusCode::kRemote),
                              .job = h.job,
                              .b = msg.size()},
                             msg)
                    .isOk();
            }
        }
        std::unique_lock<std::mutex> section(fence_->section);
        if (fence_->superseded.load()) return false;
        uint8_t hb[kHeaderBytes];
        encodeHeader({.type = kReadData, .aux = 0, .job = h.job, .b = h.b}, hb);
        IovCursor cur;
        cur.add(hb, sizeof(hb));
        for (uint32_t i = 0; i < h.aux; ++i) cur.add(reinterpret_cast<void*>(runAddr(i)), runLen(i));
        auto check = [&](bool) {
            if (sh_.stopping.load()) return Status::canceled("tcp backend is closing");
            if (fence_->superseded.load()) return Status::canceled("tcp: superseded by a newer connection");
            // Mid-frame there is no way to tell the peer: the connection goes down instead.
            if (!pins.alive()) return Status::remote("source region deregistered during a read");
            return Status::ok();
        };
        return moveAll(fd_, true, cur, check, "tcp target").isOk();
    }

    bool onNotify(const Header& h) {
        if (h.b > kMaxNotifyBytes) return false;
        Bytes payload(h.b);
        if (!recvBytes(fd_, payload.data(), payload.size(), stopCheck(), "tcp target").isOk()) return false;
        sh_.sink->deliver(peer_name_, peer_instance_, std::move(payload));
        return reply({.type = kNotifyAck, .job = h.job}).isOk();
    }

    Shared& sh_;
    int fd_;
    std::string peer_name_;
    uint64_t peer_instance_ = 0;
    std::vector<uint8_t> table_;
    std::vector<uint8_t> scratch_;
    std::vector<uint8_t> out_;
    std::unordered_map<uint64_t, Status> failed_;  // WRITE jobs that hit an error, until their END
    std::shared_ptr<InboundFence> fence_;
};

void reapInbound(Shared& sh) {
    std::list<Shared::Inbound> finished;
    {
        std::lock_guard<std::mutex> lock(sh.mutex);
        for (auto it = sh.inbound.begin(); it != sh.inbound.end();) {
            if (it->done->load()) {
                finished.splice(finished.end(), sh.inbound, it++);
            } else {
                ++it;
            }
        }
    }
    for (auto& in : finished) in.thread.join();
}

}  // namespace

void listenLoop(const std::shared_ptr<Shared>& sh) {
    for (;;) {
        pollfd fds[2] = {{sh->listen_fd.fd, POLLIN, 0}, {sh->wake_fd.fd, POLLIN, 0}};
        const int r = ::poll(fds, 2, 1000);
        if (sh->stopping.load()) return;
        reapInbound(*sh);
        if (r <= 0 || !(fds[0].revents & POLLIN)) continue;
        const int c = ::accept4(sh->listen_fd.fd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                std::this_thread::sleep_for(10ms);  // do not spin on a pending connection
            }
            continue;
        }
        tuneConnection(c);
        setSliceTimeouts(c);
        auto done = std::make_shared<std::atomic<bool>>(false);
        std::lock_guard<std::mutex> lock(sh->mutex);
        sh->inbound.push_back({Fd(c), {}, done});
        sh->inbound.back().thread = std::thread([sh, c, done] {
            InboundConnection(*sh, c).serve();
            ::shutdown(c, SHUT_RDWR);
            done->store(true);
        });
    }
}

}  // namespace kvxfer::tcp
