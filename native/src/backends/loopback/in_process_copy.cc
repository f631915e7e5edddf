#include "backends/loopback/in_process_copy.h"

#include <algorithm>

#include "util/fast_copy.h"

namespace kvxfer {

Status copyInProcess(TransferJob& job, uint64_t first, uint64_t end) {
    while (first < end) {
        const uint32_t p = job.partOf(first);
        const JobPart& part = job.parts[p];
        const uint64_t part_end = p + 1 < job.parts.size() ? job.parts[p + 1].first_run : job.num_runs;
        const uint64_t stop = std::min(end, part_end);
        auto* local = static_cast<InProcessRegion*>(part.local.backend);
        auto* remote = static_cast<InProcessRemoteRegion*>(part.remote.backend);
        if (!remote->pin || !remote->pin->enter()) {
            return Status::remote("peer region " + std::to_string(part.remote.id) +
                                  " is no longer registered");
        }
        if (!local->pin->enter()) {
            remote->pin->exit();
            return Status::canceled("local region " + std::to_string(part.local.id) +
                                    " is no longer registered");
        }
        for (uint64_t i = first; i < stop; ++i) {
            const FlatRun r = job.run(i);
            auto* far = reinterpret_cast<uint8_t*>(r.remote_address);
            if (job.op == Op::kWrite) {
                copyRun(far, r.local, r.length);
            } else {
                copyRun(r.local, far, r.length);
            }
        }
        copyFence();
        local->pin->exit();
        remote->pin->exit();
        first = stop;
    }
    return Status::ok();
}

}  // namespace kvxfer
