// Fault: a scriptable in-process backend for tests. It moves bytes like loopback (memcpy
// between engines of one process; connections, registrations and notifications are the
// loopback backend's) but injects faults on a script, so the core's lifecycle (deadlines,
// cancellation, failures, partial completion) can be driven deterministically, by our
// conformance suite and by frameworks' own unit tests.
//
// Script (FaultConfig::script, env KVXFER_FAULT_SCRIPT): rules separated by ';'
//   delay[@N|@*]=MS      hold the job MS milliseconds before moving it
//   fail[@N|@*]=CODE     fail the job with CODE (REMOTE, SYSTEM, PEER_UNREACHABLE, ...)
//   hang[@N|@*]          never move the job: it ends only by cancel or its deadline
//   partial[@N|@*]       move the first half of its runs, then fail with SYSTEM
//   drop[@N|@*]          the connection dies when job N is submitted: submit refuses it
//                        (PEER_UNREACHABLE, nothing started), as a dead QP or socket does;
//                        a new connect() gives a live connection (the core reconnects)
// N is the 1-based index of the job in submission order on this backend; no '@' or '@*'
// means every job. The first rule matching a job applies.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "backends/factories.h"
#include "backends/loopback/in_process_copy.h"
#include "kvxfer/config.h"
#include "util/thread_group.h"

namespace kvxfer {
namespace {

enum class Action : uint8_t { kNone, kDelay, kFail, kHang, kPartial, kDrop };

struct Rule {
    Action action = Action::kNone;
    uint64_t job = 0;  // 0 = every job
    uint64_t millis = 0;
    StatusCode code = StatusCode::kSystem;
};

Result<StatusCode> codeByName(const std::string& name) {
    for (int c = 1; c <= static_cast<int>(StatusCode::kInternal); ++c) {
        if (name == statusCodeName(static_cast<StatusCode>(c))) return static_cast<StatusCode>(c);
    }
    return Status::invalidArgument("fault script: unknown status code '" + name + "'");
}

Result<std::vector<Rule>> parseScript(const std::string& script) {
    std::vector<Rule> rules;
    size_t pos = 0;
    while (pos <= script.size()) {
        const size_t end = std::min(script.find(';', pos), script.size());
        std::string item = script.substr(pos, end - pos);
        pos = end + 1;
        item.erase(std::remove(item.begin(), item.end(), ' '), item.end());
        if (item.empty()) continue;
        Rule r;
        std::string head = item, value;
        if (auto eq = item.find('='); eq != std::string::npos) {
            head = item.substr(0, eq);
            value = item.substr(eq + 1);
        }
        std::string action = head, which;
        if (auto at = head.find('@'); at != std::string::npos) {
            action = head.substr(0, at);
            which = head.substr(at + 1);
        }
        if (!which.empty() && which != "*") {
            if (!std::all_of(which.begin(), which.end(), ::isdigit) || which.size() > 12 ||
                std::stoull(which) == 0) {
                return Status::invalidArgument("fault script: '" + item + "': @N needs a job number >= 1");
            }
            r.job = std::stoull(which);
        }
        if (action == "delay") {
            if (value.empty() || value.size() > 9 || !std::all_of(value.begin(), value.end(), ::isdigit)) {
                return Status::invalidArgument("fault script: '" + item + "': delay needs =MILLISECONDS");
            }
            r.action = Action::kDelay;
            r.millis = std::stoull(value);
        } else if (action == "fail") {
            KVXFER_ASSIGN_OR_RETURN(r.code, codeByName(value.empty() ? "SYSTEM" : value));
            r.action = Action::kFail;
        } else if (action == "hang" && value.empty()) {
            r.action = Action::kHang;
        } else if (action == "partial" && value.empty()) {
            r.action = Action::kPartial;
        } else if (action == "drop" && value.empty()) {
            r.action = Action::kDrop;
        } else {
            return Status::invalidArgument("fault script: cannot parse '" + item +
                                           "' (delay=MS, fail=CODE, hang, partial, drop; optional @N or @*)");
        }
        rules.push_back(r);
    }
    return rules;
}

// A connection that the script can kill; wraps loopback's.
struct FaultPeer final : BackendPeer {
    std::shared_ptr<BackendPeer> inner;
    std::atomic<bool> dead{false};
};

BackendPeer& innerOf(BackendPeer& p) { return *static_cast<FaultPeer&>(p).inner; }

struct Item {
    Clock::time_point due;
    std::shared_ptr<TransferJob> job;
    Rule rule;
};

// Everything the worker thread touches. The thread (one of the engine's ThreadGroup)
// holds it, never the backend.
struct FaultState {
    std::shared_ptr<Backend> inner;  // loopback: connections, registrations, notifications
    std::vector<Rule> rules;
    std::mutex mutex;
    std::condition_variable cv;
    std::deque<Item> queue;
    std::map<TransferJob*, std::shared_ptr<TransferJob>> hung;
    uint64_t submitted = 0;
    bool stop = false;

    void run() {
        std::unique_lock<std::mutex> lock(mutex);
        for (;;) {
            if (stop) break;
            auto ready = std::find_if(queue.begin(), queue.end(), [](const Item& i) {
                return Clock::now() >= i.due || i.job->abandoned();
            });
            if (ready == queue.end()) {
                auto next = Clock::time_point::max();
                for (const auto& i : queue) next = std::min(next, i.due);
                if (next == Clock::time_point::max()) {
                    cv.wait(lock);
                } else {
                    cv.wait_until(lock, next);
                }
                continue;
            }
            Item item = std::move(*ready);
            queue.erase(ready);
            lock.unlock();
            execute(item);
            item.job.reset();
            lock.lock();
        }
        // Shutting down: nothing may stay PENDING.
        std::deque<Item> left;
        left.swap(queue);
        auto stuck = std::move(hung);
        lock.unlock();
        for (auto& i : left) i.job->dataDone(Status::canceled("fault backend shut down"), false);
        for (auto& [p, j] : stuck) j->dataDone(Status::canceled("fault backend shut down"), false);
    }

    void execute(const Item& item) {
        TransferJob& job = *item.job;
        if (job.abandoned()) {
            job.dataDone(Status::ok(), false);
            return;
        }
        if (item.rule.action == Action::kFail) {
            job.dataDone(Status(item.rule.code,
                                "fault backend: injected failure of transfer " + std::to_string(job.id)),
                         false);
            return;
        }
        if (item.rule.action == Action::kPartial) {
            Status st = copyInProcess(job, 0, job.num_runs / 2);
            if (st.isOk()) {
                st = Status::system("fault backend: injected partial completion (" +
                                    std::to_string(job.num_runs / 2) + " of " + std::to_string(job.num_runs) +
                                    " runs)");
            }
            job.dataDone(std::move(st), false);
            return;
        }
        Status st = copyInProcess(job, 0, job.num_runs);
        if (job.dataDone(std::move(st), true) == TransferJob::AfterData::kSendNotification) {
            job.finish(inner->notify(innerOf(*job.peer), job.notify, job.deadline));
        }
    }
};

class FaultBackend final : public Backend {
public:
    FaultBackend(ThreadGroup& threads, std::unique_ptr<Backend> inner, std::vector<Rule> rules)
        : state_(std::make_shared<FaultState>()) {
        state_->inner = std::move(inner);
        state_->rules = std::move(rules);
        caps_ = state_->inner->caps();
        threads.spawn([s = state_] { s->run(); });  // at engine creation: the group is open
    }

    ~FaultBackend() override { shutdown(); }

    // The worker ends what is queued or hung (canceled) and returns.
    void shutdown() override {
        {
            std::lock_guard<std::mutex> lock(state_->mutex);
            state_->stop = true;
        }
        state_->cv.notify_all();
        state_->inner->shutdown();
    }

    std::string_view name() const override { return "fault"; }
    const BackendCaps& caps() const override { return caps_; }
    Bytes endpointInfo() const override { return state_->inner->endpointInfo(); }
    std::string describe() const override {
        return "fault (in-process memcpy with " + std::to_string(state_->rules.size()) +
               " scripted fault rules)";
    }
    Result<std::unique_ptr<BackendRegion>> registerMemory(const MemorySpan& span) override {
        return state_->inner->registerMemory(span);
    }
    Result<std::shared_ptr<BackendPeer>> connect(const PeerIdentity& peer, ByteView info,
                                                 Clock::time_point deadline) override {
        KVXFER_ASSIGN_OR_RETURN(auto inner, state_->inner->connect(peer, info, deadline));
        auto conn = std::make_shared<FaultPeer>();
        conn->inner = std::move(inner);
        return std::shared_ptr<BackendPeer>(std::move(conn));
    }
    Result<std::unique_ptr<BackendRemoteRegion>> importRemoteRegion(BackendPeer& peer,
                                                                    const RegionDescriptor& r,
                                                                    ByteView key) override {
        return state_->inner->importRemoteRegion(innerOf(peer), r, key);
    }
    Status notify(BackendPeer& peer, ByteView payload, Clock::time_point deadline) override {
        if (static_cast<FaultPeer&>(peer).dead.load()) {
            return Status::peerUnreachable("fault backend: connection dropped");
        }
        return state_->inner->notify(innerOf(peer), payload, deadline);
    }

    Status submit(const std::shared_ptr<TransferJob>& job) override {
        FaultState& s = *state_;
        std::lock_guard<std::mutex> lock(s.mutex);
        if (s.stop) return Status::canceled("fault backend is shutting down");
        auto& conn = static_cast<FaultPeer&>(*job->peer);
        if (conn.dead.load()) return Status::peerUnreachable("fault backend: connection dropped");
        const uint64_t n = ++s.submitted;
        Rule rule;
        for (const auto& r : s.rules) {
            if (r.job == 0 || r.job == n) {
                rule = r;
                break;
            }
        }
        if (rule.action == Action::kDrop) {
            conn.dead.store(true);
            return Status::peerUnreachable("fault backend: connection dropped at transfer " +
                                           std::to_string(n));
        }
        const auto due =
            Clock::now() + std::chrono::milliseconds(rule.action == Action::kDelay ? rule.millis : 0);
        if (rule.action == Action::kHang) {
            s.hung[job.get()] = job;
        } else {
            s.queue.push_back({due, job, rule});
        }
        s.cv.notify_all();
        return Status::ok();
    }

    void cancel(TransferJob& job) override {
        std::shared_ptr<TransferJob> stuck;
        {
            std::lock_guard<std::mutex> lock(state_->mutex);
            auto it = state_->hung.find(&job);
            if (it != state_->hung.end()) {
                stuck = it->second;
                state_->hung.erase(it);
            }
        }
        if (stuck) stuck->dataDone(Status::ok(), false);  // ends CANCELED/TIMEOUT as abandoned
        state_->cv.notify_all();                          // a delayed job stops waiting
    }

private:
    std::shared_ptr<FaultState> state_;
    BackendCaps caps_;
};

}  // namespace

Result<std::unique_ptr<Backend>> createFaultBackend(const BackendContext& context) {
    KVXFER_ASSIGN_OR_RETURN(auto rules, parseScript(context.config->fault.script));
    KVXFER_ASSIGN_OR_RETURN(auto inner, createLoopbackBackend(context));
    return std::unique_ptr<Backend>(new FaultBackend(*context.threads, std::move(inner), std::move(rules)));
}

}  // namespace kvxfer
