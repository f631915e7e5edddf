// The public GPU helpers (kvxfer/gpu.h) over native/src/cuda.
#include "cuda/copy.h"
#include "cuda/driver.h"
#include "kvxfer/gpu.h"

namespace kvxfer {
namespace {

class PlanImpl final : public GpuCopyPlan {
public:
    explicit PlanImpl(std::unique_ptr<cuda::CopyPlan> p) : plan_(std::move(p)) {}
    Status launch(uint64_t src, uint64_t src_bytes, uint64_t dst, uint64_t dst_bytes, bool swap,
                  uint64_t stream) const override {
        return plan_->launch(src, src_bytes, dst, dst_bytes, swap, stream);
    }
    int device() const override { return plan_->device(); }
    uint64_t bytes() const override { return plan_->bytes(); }
    uint64_t runs() const override { return plan_->runs(); }
    uint64_t kernelEntries() const override { return plan_->entries(); }

private:
    std::unique_ptr<cuda::CopyPlan> plan_;
};

}  // namespace

Status cudaStatus() { return cuda::cudaAvailability(); }

Result<int> cudaPointerDevice(uint64_t ptr) { return cuda::pointerDevice(ptr); }

Result<std::shared_ptr<GpuCopyPlan>> makeGpuCopyPlan(int device, std::span<const GpuRun> runs) {
    std::vector<cuda::RunEntry> table;
    table.reserve(runs.size());
    for (const GpuRun& r : runs) table.push_back({r.src, r.dst, r.length});
    KVXFER_ASSIGN_OR_RETURN(auto plan, cuda::CopyPlan::create(device, table));
    return std::shared_ptr<GpuCopyPlan>(std::make_shared<PlanImpl>(std::move(plan)));
}

}  // namespace kvxfer
