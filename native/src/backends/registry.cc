// The one place that knows every backend (and the only file with KVXFER_HAVE_* switches).
#include "backends/factories.h"

namespace kvxfer {
namespace {

struct Entry {
    const char* name;
    bool on_by_default;  // started by an Engine that names no backends
    Status (*availability)();
    Result<std::unique_ptr<Backend>> (*create)(const BackendContext&);
};

Status alwaysAvailable() { return Status::ok(); }

const std::vector<Entry>& entries() {
    static const std::vector<Entry> list = {
        {"loopback", true, alwaysAvailable, createLoopbackBackend},
        {"shm", true, shmAvailability, createShmBackend},
#if KVXFER_HAVE_IBVERBS
        {"ibverbs", true, ibverbsAvailability, createIbverbsBackend},
#endif
#if KVXFER_HAVE_FAULT
        // Test backend with scripted faults: only when asked for by name.
        {"fault", false, alwaysAvailable, createFaultBackend},
#endif
#if KVXFER_HAVE_CUDA_IPC
        // GPU memory only; advertised where the CUDA driver loads. Started when asked for by
        // name: a peer is reached through one backend, and host memory needs shm or tcp.
        {"cuda_ipc", false, cudaIpcAvailability, createCudaIpcBackend},
#endif
#if KVXFER_HAVE_TCP
        // Listens on a socket: started only when asked for by name.
        {"tcp", false, alwaysAvailable, createTcpBackend},
#endif
    };
    return list;
}

}  // namespace

std::vector<BackendInfo> listBackends() {
    std::vector<BackendInfo> out;
    for (const auto& e : entries()) {
        Status st = e.availability();
        out.push_back({e.name, st.isOk(), st.isOk() ? "" : st.message(), e.on_by_default});
    }
#if !KVXFER_HAVE_IBVERBS
    out.push_back({"ibverbs", false, "this build has no ibverbs backend (KVXFER_WITH_IBVERBS=OFF)", false});
#endif
    return out;
}

Result<std::unique_ptr<Backend>> createBackend(const std::string& name, const BackendContext& context) {
    for (const auto& e : entries()) {
        if (name != e.name) continue;
        Status st = e.availability();
        if (!st.isOk()) return Status::unsupported("backend '" + name + "' is unavailable: " + st.message());
        return e.create(context);
    }
    std::string known;
    for (const auto& e : entries()) known += std::string(known.empty() ? "" : ", ") + e.name;
    return Status::notFound("unknown backend '" + name + "' (this build has: " + known + ")");
}

}  // namespace kvxfer
