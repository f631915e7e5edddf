#include "backends/ibverbs/verbs_loader.h"

#include <dlfcn.h>

#include <cstring>
#include <mutex>
#include <string>

namespace kvxfer::ib {
namespace {

// rdma-core exports the current ABI of most verbs under IBVERBS_1.1 and keeps IBVERBS_1.0
// compatibility versions beside them: ask for 1.1 first so dlsym cannot return the old one.
void* resolve(void* handle, const char* name, const char* version) {
    if (version != nullptr) {
        if (void* p = ::dlvsym(handle, name, version)) return p;
    }
    return ::dlsym(handle, name);
}

template <typename Fn>
bool bind(void* handle, Fn& slot, const char* name, const char* version, std::string* missing) {
    slot = reinterpret_cast<Fn>(resolve(handle, name, version));
    if (slot == nullptr && missing != nullptr) {
        if (!missing->empty()) *missing += ", ";
        *missing += name;
    }
    return slot != nullptr;
}

struct Loaded {
    VerbsApi api;
    Status status;
};

Loaded load() {
    Loaded out;
    ::dlerror();
    void* handle = ::dlopen("libibverbs.so.1", RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
        const char* err = ::dlerror();
        out.status = Status::unsupported(std::string("libibverbs.so.1 cannot be loaded (") +
                                         (err ? err : "unknown error") +
                                         "); install rdma-core's libibverbs1 and a provider package "
                                         "(Debian: libibverbs1 ibverbs-providers)");
        return out;
    }
    VerbsApi& a = out.api;
    std::string missing;
    const char* v11 = "IBVERBS_1.1";
    bind(handle, a.get_device_list, "ibv_get_device_list", v11, &missing);
    bind(handle, a.free_device_list, "ibv_free_device_list", v11, &missing);
    bind(handle, a.get_device_name, "ibv_get_device_name", v11, &missing);
    bind(handle, a.open_device, "ibv_open_device", v11, &missing);
    bind(handle, a.close_device, "ibv_close_device", v11, &missing);
    bind(handle, a.query_device, "ibv_query_device", v11, &missing);
    bind(handle, a.query_port_raw, "ibv_query_port", v11, &missing);
    bind(handle, a.query_gid, "ibv_query_gid", v11, &missing);
    bind(handle, a.query_gid_ex, "_ibv_query_gid_ex", "IBVERBS_1.11", nullptr);  // optional
    bind(handle, a.get_async_event, "ibv_get_async_event", v11, &missing);
    bind(handle, a.ack_async_event, "ibv_ack_async_event", v11, &missing);
    bind(handle, a.alloc_pd, "ibv_alloc_pd", v11, &missing);
    bind(handle, a.dealloc_pd, "ibv_dealloc_pd", v11, &missing);
    bind(handle, a.reg_mr, "ibv_reg_mr", v11, &missing);
    bind(handle, a.dereg_mr, "ibv_dereg_mr", v11, &missing);
    bind(handle, a.reg_dmabuf_mr, "ibv_reg_dmabuf_mr", "IBVERBS_1.12", nullptr);  // optional
    bind(handle, a.create_comp_channel, "ibv_create_comp_channel", v11, &missing);
    bind(handle, a.destroy_comp_channel, "ibv_destroy_comp_channel", v11, &missing);
    bind(handle, a.create_cq, "ibv_create_cq", v11, &missing);
    bind(handle, a.destroy_cq, "ibv_destroy_cq", v11, &missing);
    bind(handle, a.get_cq_event, "ibv_get_cq_event", v11, &missing);
    bind(handle, a.ack_cq_events, "ibv_ack_cq_events", v11, &missing);
    bind(handle, a.create_qp, "ibv_create_qp", v11, &missing);
    bind(handle, a.modify_qp, "ibv_modify_qp", v11, &missing);
    bind(handle, a.destroy_qp, "ibv_destroy_qp", v11, &missing);
    bind(handle, a.create_srq, "ibv_create_srq", v11, &missing);
    bind(handle, a.destroy_srq, "ibv_destroy_srq", v11, &missing);
    bind(handle, a.create_ah, "ibv_create_ah", v11, &missing);
    bind(handle, a.destroy_ah, "ibv_destroy_ah", v11, &missing);
    bind(handle, a.wc_status_str, "ibv_wc_status_str", v11, nullptr);
    bind(handle, a.event_type_str, "ibv_event_type_str", v11, nullptr);
    if (!missing.empty()) {
        out.status = Status::unsupported("libibverbs.so.1 lacks required symbols (" + missing +
                                         "): rdma-core is too old or broken");
    }
    // The handle is never closed: provider libraries and function pointers stay valid for
    // the life of the process.
    return out;
}

}  // namespace

int VerbsApi::queryPort(ibv_context* context, uint8_t port, ibv_port_attr* attr) const {
    std::memset(attr, 0, sizeof(*attr));
    // Prefer the provider's extended query (what the header's inline does), which also
    // fills the fields after the compat prefix; fall back to the exported symbol.
    verbs_context* vctx = verbs_get_ctx_op(context, query_port);
    if (vctx != nullptr) return vctx->query_port(context, port, attr, sizeof(*attr));
    return query_port_raw(context, port, attr);
}

const char* VerbsApi::statusText(ibv_wc_status status) const {
    return wc_status_str != nullptr ? wc_status_str(status) : "unknown work completion status";
}

const char* VerbsApi::eventText(ibv_event_type event) const {
    return event_type_str != nullptr ? event_type_str(event) : "unknown async event";
}

Result<const VerbsApi*> loadVerbs() {
    static const Loaded* loaded = new Loaded(load());  // thread-safe, once, never freed
    if (!loaded->status.isOk()) return loaded->status;
    return &loaded->api;
}

}  // namespace kvxfer::ib
