// ibverbs backend: the life of a Work (a transfer or a standalone notification) on the
// progress thread: admitted from a command, queued on its connection, advanced when nothing
// of it is outstanding (data, then the core's commit decision, then the notification SEND),
// stopped when abandoned, finished, or failed with the whole device.
#include "backends/ibverbs/shared.h"

namespace kvxfer::ib {

// ================================================================================================
// jobs

void Shared::admitJob(Command& cmd) {
    auto w = std::make_unique<Work>();
    Work& work = *w;
    work.job = std::move(cmd.job);
    work.conn = std::move(cmd.conn);
    works_.push_back(std::move(w));
    work_index_[&work] = std::prev(works_.end());
    const TransferJob& j = *work.job;
    work.opcode = j.op == Op::kWrite ? IBV_WR_RDMA_WRITE : IBV_WR_RDMA_READ;
    work.keys.reserve(j.parts.size());
    for (const JobPart& p : j.parts) {
        const RemoteKey& key = static_cast<IbRemoteRegion*>(p.remote.backend)->key;
        work.keys.push_back({static_cast<IbRegion*>(p.local.backend)->lkey(), key.rkey, key.address});
    }
    work.total = j.num_runs;
    if (deviceDead()) return finishWork(work, deviceDeadStatus());
    if (work.conn->state == ConnState::kDead) return finishWork(work, work.conn->deadStatus());
    advance(work);  // queues its data (or goes straight to the notification)
}

void Shared::admitNotify(Command& cmd) {
    auto w = std::make_unique<Work>();
    Work& work = *w;
    work.waiter = std::move(cmd.waiter);
    work.conn = std::move(cmd.conn);
    work.payload = std::move(cmd.payload);
    works_.push_back(std::move(w));
    work_index_[&work] = std::prev(works_.end());
    if (deviceDead()) return finishWork(work, deviceDeadStatus());
    if (work.conn->state == ConnState::kDead) return finishWork(work, work.conn->deadStatus());
    work.phase = Work::Phase::kNotifyQueued;
    enqueueWork(work);
}

void Shared::enqueueWork(Work& w) {
    if (w.queued) return;
    w.queued = true;
    Connection& c = *w.conn;
    c.queue.push_back(&w);
    if (!c.in_ready && c.registered) {
        c.in_ready = true;
        ready_queue_.push_back(&c);
    }
}

void Shared::finishWork(Work& w, Status st) {
    if (w.phase == Work::Phase::kFinished) return;
    w.phase = Work::Phase::kFinished;
    if (w.queued) {
        auto& q = w.conn->queue;
        q.erase(std::remove(q.begin(), q.end(), &w), q.end());
        w.queued = false;
    }
    if (w.notify_slot >= 0) {
        free_notify_.push_back(w.notify_slot);
        w.notify_slot = -1;
        if (w.conn && w.conn->notify_held > 0) --w.conn->notify_held;
    }
    if (w.job) w.job->finish(std::move(st));
    if (w.waiter) w.waiter->set(std::move(st));
    auto it = work_index_.find(&w);
    if (it != work_index_.end()) {
        graveyard_.push_back(std::move(*it->second));
        works_.erase(it->second);
        work_index_.erase(it);
    }
}

// Moves a work forward once nothing of it is outstanding.
void Shared::advance(Work& w) {
    if (w.phase == Work::Phase::kFinished || w.outstanding > 0) return;
    if (w.phase == Work::Phase::kNotifyPosted) return finishWork(w, w.error);
    if (w.phase == Work::Phase::kNotifyQueued) {
        if (!w.error.isOk()) return finishWork(w, w.error);
        return;  // waits in its connection's queue
    }
    // Data phase: more to post, or the data outcome goes to the core's job machine.
    const bool running = w.error.isOk() && !w.stopped && !(w.job && w.job->abandoned());
    if (running && w.dataLeft()) {
        enqueueWork(w);
        return;
    }
    if (w.job) {
        Status fin;
        const bool all_moved = running && !w.dataLeft();
        if (w.job->decideAfterData(w.error, all_moved, &fin) == TransferJob::AfterData::kFinished) {
            return finishWork(w, std::move(fin));
        }
    } else if (!w.error.isOk()) {
        return finishWork(w, w.error);
    } else if (w.payload.empty()) {
        return finishWork(w, Status::ok());
    }
    w.phase = Work::Phase::kNotifyQueued;
    enqueueWork(w);
}

void Shared::sweepAbandoned() {
    // Deadlines and cancellation: stop posting; finish once nothing is outstanding.
    std::vector<Work*> check;
    for (auto& w : works_) {
        if (w->phase == Work::Phase::kData && w->job && !w->stopped && w->job->abandoned())
            check.push_back(w.get());
    }
    for (Work* w : check) {
        w->stopped = true;
        if (w->queued) {
            auto& q = w->conn->queue;
            q.erase(std::remove(q.begin(), q.end(), w), q.end());
            w->queued = false;
        }
        advance(*w);
    }
    // Released connections are destroyed once drained.
    for (size_t i = 0; i < closing_.size();) {
        bool busy = false;
        for (auto& s : closing_[i]->slots) busy |= !s.window.empty();
        if (!busy) {
            unregisterConnection(*closing_[i]);
            closing_.erase(closing_.begin() + static_cast<long>(i));
        } else {
            ++i;
        }
    }
}

void Shared::failEverything(Status st) {
    for (auto& [id, conn] : initiated_) {
        connectionDead(*conn, st);
        for (auto& s : conn->slots) {
            s.window.reset();  // nothing will complete: forget the works it referenced
            s.state = SlotState::kDead;
        }
    }
    for (auto& c : closing_) {
        for (auto& s : c->slots) s.window.reset();
    }
    send_in_flight_ = 0;
    std::vector<Work*> all;
    for (auto& w : works_) all.push_back(w.get());
    // The device is gone: no WR will complete and none can touch memory any more.
    for (Work* w : all) {
        w->outstanding = 0;
        if (w->error.isOk()) w->error = st;
        finishWork(*w, st);
    }
}

}  // namespace kvxfer::ib
