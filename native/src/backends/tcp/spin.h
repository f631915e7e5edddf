// TCP backend: the bounded, adaptive busy-poll before a thread sleeps on a socket
// (TcpConfig::spin_us). Used by the target's listener (after it served small frames it
// keeps reading that connection, and every 4th look its epoll set with a zero timeout,
// before blocking: server.cc) and by the caller that waits for its inline job's ACK
// (non-blocking reads before the blocking one: receiver.cc). Private to this directory.
//
// Why: in a one-request-at-a-time exchange the next frame usually comes within tens of
// microseconds, and a thread that sleeps pays the kernel's wake-up, on a VM the wake-up of
// a halted vCPU (tens of microseconds). Cost: up to the budget of CPU per wait that finds
// nothing. Bounds: the budget (0 = off); a spin runs only right after traffic (an idle
// engine spins never); after kMisses spins in a row found nothing, only one wait in
// kProbeEvery spins, until a spin finds something again, so traffic slower than the
// budget costs about budget / kProbeEvery per frame.
#pragma once

#include <sched.h>

#include <chrono>
#include <cstdint>

#include "kvxfer/backend.h"

namespace kvxfer::tcp {

// Between two polls of a spin: give the CPU to any other runnable thread. A spinner that
// only paused would hold its CPU against the very thread it waits for when the scheduler
// wakes that one on the same CPU (a socket wake-up prefers the waker's CPU), and against
// other work on a machine with few cores; measured in docs/benchmarks.md.
inline void spinPause() { sched_yield(); }

// One waiting thread's spin decisions. Not thread-safe: one owner at a time (the listener
// thread; a connection's current reader).
class AdaptiveSpin {
public:
    static constexpr uint32_t kMisses = 4;
    static constexpr uint32_t kProbeEvery = 16;
    static constexpr uint32_t kMaxUs = 1000000;  // the largest TcpConfig::spin_us accepted

    void setBudget(uint32_t us) { budget_ = std::chrono::microseconds(us < kMaxUs ? us : kMaxUs); }
    Clock::duration budget() const { return budget_; }

    // The spin allowed before this wait: the budget, or zero (off, or recent spins found
    // nothing and this is not a probe).
    Clock::duration next() {
        if (budget_.count() == 0) return Clock::duration::zero();
        if (misses_ < kMisses) return budget_;
        return (++skipped_ % kProbeEvery == 0) ? Clock::duration(budget_) : Clock::duration::zero();
    }
    // What a spin returned by next() found.
    void result(bool hit) {
        if (hit) {
            misses_ = 0;
            skipped_ = 0;
        } else if (misses_ < kMisses) {
            ++misses_;
        }
    }

private:
    std::chrono::microseconds budget_{0};
    uint32_t misses_ = 0;
    uint32_t skipped_ = 0;
};

}  // namespace kvxfer::tcp
