// GPUDirect registration's decision logic (native/src/backends/ibverbs/memory.h,
// registerGpuMemory) with fake steps: dma-buf first, then peer memory, else a typed
// error naming why each failed; the dma-buf fd is closed on every path. No RDMA device
// or GPU needed (the real path is untested here: docs/gpu.md says why).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "backends/ibverbs/memory.h"

namespace kvxfer::ib {
namespace {

constexpr uint64_t kPage = 4096;

bool fdOpen(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

struct Fakes {
    std::vector<std::string> calls;
    ibv_mr mr{};
    std::vector<int> exported;  // fds handed out by export_dmabuf
    uint64_t export_base = 0, export_bytes = 0;
    uint64_t dmabuf_offset = 0, dmabuf_iova = 0;
    size_t dmabuf_length = 0;
    int dmabuf_fd = -1;

    GpuRegistrationSteps steps(bool export_ok, int dmabuf_errno, int reg_mr_errno) {
        GpuRegistrationSteps s;
        s.page_bytes = kPage;
        s.export_dmabuf = [this, export_ok](uint64_t base, uint64_t bytes) -> Result<int> {
            calls.push_back("export");
            export_base = base;
            export_bytes = bytes;
            if (!export_ok) return Status::unsupported("CUDA_ERROR_NOT_SUPPORTED");
            int p[2];
            if (::pipe(p) != 0) return Status::systemErrno("pipe", errno);
            ::close(p[1]);
            exported.push_back(p[0]);
            return p[0];
        };
        s.reg_dmabuf_mr = [this, dmabuf_errno](uint64_t offset, size_t length, uint64_t iova, int fd,
                                               int) -> ibv_mr* {
            calls.push_back("reg_dmabuf_mr");
            dmabuf_offset = offset;
            dmabuf_length = length;
            dmabuf_iova = iova;
            dmabuf_fd = fd;
            EXPECT_TRUE(fdOpen(fd));
            if (dmabuf_errno != 0) {
                errno = dmabuf_errno;
                return nullptr;
            }
            return &mr;
        };
        s.reg_mr = [this, reg_mr_errno](void*, size_t, int) -> ibv_mr* {
            calls.push_back("reg_mr");
            if (reg_mr_errno != 0) {
                errno = reg_mr_errno;
                return nullptr;
            }
            return &mr;
        };
        s.close_fd = [this](int fd) {
            calls.push_back("close");
            return ::close(fd);
        };
        return s;
    }
    void expectNoFdLeft() const {
        for (int fd : exported) EXPECT_FALSE(fdOpen(fd)) << "dma-buf fd " << fd << " left open";
    }
};

// An unaligned region: 0x10000100 .. +3 pages + 0x80.
void* const kAddr = reinterpret_cast<void*>(uintptr_t{0x10000100});
constexpr uint64_t kLength = 3 * kPage + 0x80;

TEST(IbverbsGpuMemory, DmabufFirstOverThePageAlignedRangeAndFdClosed) {
    Fakes f;
    auto r = registerGpuMemory(f.steps(true, 0, 0), kAddr, kLength, IBV_ACCESS_LOCAL_WRITE, "mlx5_0");
    ASSERT_TRUE(r.isOk()) << r.status().message();
    EXPECT_EQ(r->mr, &f.mr);
    EXPECT_STREQ(r->path, "dma-buf");
    EXPECT_EQ(f.calls, (std::vector<std::string>{"export", "reg_dmabuf_mr", "close"}));
    EXPECT_EQ(f.export_base, 0x10000000u);
    EXPECT_EQ(f.export_bytes, 4 * kPage);  // 0x10000000 .. 0x10004000 covers the region's end
    EXPECT_EQ(f.dmabuf_offset, 0x100u);
    EXPECT_EQ(f.dmabuf_length, kLength);
    EXPECT_EQ(f.dmabuf_iova, 0x10000100u);  // remote addresses stay the region's virtual addresses
    f.expectNoFdLeft();
}

TEST(IbverbsGpuMemory, NicWithoutDmabufFallsBackToPeerMemoryAndClosesFd) {
    Fakes f;
    auto r = registerGpuMemory(f.steps(true, EOPNOTSUPP, 0), kAddr, kLength, IBV_ACCESS_LOCAL_WRITE, "rxe0");
    ASSERT_TRUE(r.isOk()) << r.status().message();
    EXPECT_STREQ(r->path, "peer memory");
    EXPECT_EQ(f.calls, (std::vector<std::string>{"export", "reg_dmabuf_mr", "close", "reg_mr"}));
    f.expectNoFdLeft();
}

TEST(IbverbsGpuMemory, DriverWithoutExportFallsBackToPeerMemory) {
    Fakes f;
    auto r = registerGpuMemory(f.steps(false, 0, 0), kAddr, kLength, IBV_ACCESS_LOCAL_WRITE, "rxe0");
    ASSERT_TRUE(r.isOk()) << r.status().message();
    EXPECT_STREQ(r->path, "peer memory");
    EXPECT_EQ(f.calls, (std::vector<std::string>{"export", "reg_mr"}));
}

TEST(IbverbsGpuMemory, AllStepsFailingIsUnsupportedNamingEachReason) {
    Fakes f;
    auto r =
        registerGpuMemory(f.steps(true, EOPNOTSUPP, EFAULT), kAddr, kLength, IBV_ACCESS_LOCAL_WRITE, "rxe0");
    ASSERT_FALSE(r.isOk());
    EXPECT_EQ(r.status().code(), StatusCode::kUnsupported);
    const std::string& m = r.status().message();
    EXPECT_NE(m.find("rxe0"), std::string::npos) << m;
    EXPECT_NE(m.find("ibv_reg_dmabuf_mr failed: " + std::string(std::strerror(EOPNOTSUPP))),
              std::string::npos)
        << m;
    EXPECT_NE(m.find("no dma-buf support"), std::string::npos) << m;
    EXPECT_NE(m.find("ibv_reg_mr of the device pointer failed: " + std::string(std::strerror(EFAULT))),
              std::string::npos)
        << m;
    EXPECT_NE(m.find("nvidia-peermem"), std::string::npos) << m;
    EXPECT_EQ(f.calls, (std::vector<std::string>{"export", "reg_dmabuf_mr", "close", "reg_mr"}));
    f.expectNoFdLeft();
}

TEST(IbverbsGpuMemory, MissingLoaderEntriesAreNamedAndSkipped) {
    {
        Fakes f;
        GpuRegistrationSteps s = f.steps(true, 0, ENOMEM);
        s.reg_dmabuf_mr = nullptr;  // rdma-core < 34: no export is attempted (no fd to leak)
        auto r = registerGpuMemory(s, kAddr, kLength, 0, "rxe0");
        ASSERT_FALSE(r.isOk());
        EXPECT_EQ(r.status().code(), StatusCode::kUnsupported);
        EXPECT_NE(r.status().message().find("libibverbs lacks ibv_reg_dmabuf_mr"), std::string::npos);
        EXPECT_EQ(f.calls, (std::vector<std::string>{"reg_mr"}));
    }
    {
        Fakes f;
        GpuRegistrationSteps s = f.steps(true, 0, EFAULT);
        s.export_dmabuf = nullptr;  // CUDA driver < 11.7
        auto r = registerGpuMemory(s, kAddr, kLength, 0, "rxe0");
        ASSERT_FALSE(r.isOk());
        EXPECT_NE(r.status().message().find("lacks cuMemGetHandleForAddressRange"), std::string::npos);
        EXPECT_EQ(f.calls, (std::vector<std::string>{"reg_mr"}));
    }
}

TEST(IbverbsGpuMemory, AlignedRegionExportsExactlyItsPages) {
    Fakes f;
    void* addr = reinterpret_cast<void*>(uintptr_t{0x20000000});
    auto r = registerGpuMemory(f.steps(true, 0, 0), addr, 2 * kPage, 0, "rxe0");
    ASSERT_TRUE(r.isOk());
    EXPECT_EQ(f.export_base, 0x20000000u);
    EXPECT_EQ(f.export_bytes, 2 * kPage);
    EXPECT_EQ(f.dmabuf_offset, 0u);
    f.expectNoFdLeft();
}

}  // namespace
}  // namespace kvxfer::ib
