// The environment overlay: every variable it documents sets its field; a malformed value
// names the variable.
#include "kvxfer/config.h"

#include <gtest/gtest.h>

#include <cstdlib>

namespace kvxfer {
namespace {

struct EnvGuard {
    std::string name;
    explicit EnvGuard(std::string n, const char* v) : name(std::move(n)) { ::setenv(name.c_str(), v, 1); }
    ~EnvGuard() { ::unsetenv(name.c_str()); }
};

TEST(Config, OverlaySetsFields) {
    EnvGuard a("KVXFER_TCP_LISTEN", "127.0.0.1:7000");
    EnvGuard b("KVXFER_IBVERBS_QPS_PER_PEER", "4");
    EnvGuard c("KVXFER_IBVERBS_DEVICE", "rxe0");
    EnvGuard d("KVXFER_SHM_THREADS", "3");
    EngineConfig cfg;
    ASSERT_TRUE(applyEnvironment(cfg).isOk());
    EXPECT_EQ(cfg.backend.tcp.listen, "127.0.0.1:7000");
    EXPECT_EQ(cfg.backend.ibverbs.qps_per_peer, 4u);
    EXPECT_EQ(cfg.backend.ibverbs.device, "rxe0");
    EXPECT_EQ(cfg.backend.shm.threads, 3u);
}

TEST(Config, MalformedValueNamesTheVariable) {
    EnvGuard a("KVXFER_IBVERBS_QPS_PER_PEER", "lots");
    EngineConfig cfg;
    Status st = applyEnvironment(cfg);
    ASSERT_FALSE(st.isOk());
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("KVXFER_IBVERBS_QPS_PER_PEER"), std::string::npos);
}

TEST(Config, EveryListedVariableIsUnique) {
    auto vars = environmentVariables();
    EXPECT_GE(vars.size(), 15u);
    for (size_t i = 0; i < vars.size(); ++i)
        for (size_t j = i + 1; j < vars.size(); ++j) EXPECT_NE(vars[i].first, vars[j].first);
}

}  // namespace
}  // namespace kvxfer
