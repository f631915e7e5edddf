// verbs_loader: libibverbs, loaded at run time with dlopen("libibverbs.so.1").
//
// kvxfer never links libibverbs, so `import kvxfer` works on hosts without rdma-core.
// The real (exported) entry points are resolved once per process into VerbsApi; the
// data-path verbs that rdma-core defines as static inline functions over the provider's
// context ops (ibv_post_send, ibv_post_recv, ibv_post_srq_recv, ibv_poll_cq,
// ibv_req_notify_cq) need no symbol and are called straight from the headers.
//
// Never call an exported verbs function by its header name in this backend: several are
// macros or inline wrappers over versioned symbols in rdma-core >= 1.1 (ibv_reg_mr,
// ibv_query_port, ibv_get_device_list, ibv_query_gid_ex) and would pull in an undefined
// reference. Use the table below. `nm -u` on the built module must show no ibv_ symbol.
#pragma once

#include <infiniband/verbs.h>

#include <cstddef>
#include <cstdint>

#include "kvxfer/status.h"

namespace kvxfer::ib {

struct VerbsApi {
    // Devices and contexts.
    ibv_device** (*get_device_list)(int* num_devices) = nullptr;
    void (*free_device_list)(ibv_device** list) = nullptr;
    const char* (*get_device_name)(ibv_device* device) = nullptr;
    ibv_context* (*open_device)(ibv_device* device) = nullptr;
    int (*close_device)(ibv_context* context) = nullptr;
    int (*query_device)(ibv_context* context, ibv_device_attr* attr) = nullptr;
    // The exported symbol fills the compat prefix of ibv_port_attr: zero it first.
    int (*query_port_raw)(ibv_context* context, uint8_t port, void* compat_attr) = nullptr;
    int (*query_gid)(ibv_context* context, uint8_t port, int index, ibv_gid* gid) = nullptr;
    // Optional (rdma-core >= 31): GID type without sysfs.
    int (*query_gid_ex)(ibv_context* context, uint32_t port, uint32_t index, ibv_gid_entry* entry,
                        uint32_t flags, size_t entry_size) = nullptr;
    int (*get_async_event)(ibv_context* context, ibv_async_event* event) = nullptr;
    void (*ack_async_event)(ibv_async_event* event) = nullptr;

    // Protection domain and memory.
    ibv_pd* (*alloc_pd)(ibv_context* context) = nullptr;
    int (*dealloc_pd)(ibv_pd* pd) = nullptr;
    ibv_mr* (*reg_mr)(ibv_pd* pd, void* addr, size_t length, int access) = nullptr;
    int (*dereg_mr)(ibv_mr* mr) = nullptr;
    // Optional (rdma-core >= 34): registers a dma-buf (GPU memory exported by its driver).
    ibv_mr* (*reg_dmabuf_mr)(ibv_pd* pd, uint64_t offset, size_t length, uint64_t iova, int fd,
                             int access) = nullptr;

    // Completion queues and channels.
    ibv_comp_channel* (*create_comp_channel)(ibv_context* context) = nullptr;
    int (*destroy_comp_channel)(ibv_comp_channel* channel) = nullptr;
    ibv_cq* (*create_cq)(ibv_context* context, int cqe, void* cq_context, ibv_comp_channel* channel,
                         int comp_vector) = nullptr;
    int (*destroy_cq)(ibv_cq* cq) = nullptr;
    int (*get_cq_event)(ibv_comp_channel* channel, ibv_cq** cq, void** cq_context) = nullptr;
    void (*ack_cq_events)(ibv_cq* cq, unsigned int nevents) = nullptr;

    // Queue pairs, shared receive queues, address handles.
    ibv_qp* (*create_qp)(ibv_pd* pd, ibv_qp_init_attr* attr) = nullptr;
    int (*modify_qp)(ibv_qp* qp, ibv_qp_attr* attr, int attr_mask) = nullptr;
    int (*destroy_qp)(ibv_qp* qp) = nullptr;
    ibv_srq* (*create_srq)(ibv_pd* pd, ibv_srq_init_attr* attr) = nullptr;
    int (*destroy_srq)(ibv_srq* srq) = nullptr;
    ibv_ah* (*create_ah)(ibv_pd* pd, ibv_ah_attr* attr) = nullptr;
    int (*destroy_ah)(ibv_ah* ah) = nullptr;

    // Text.
    const char* (*wc_status_str)(ibv_wc_status status) = nullptr;
    const char* (*event_type_str)(ibv_event_type event) = nullptr;

    // Wrappers with the header's semantics.
    int queryPort(ibv_context* context, uint8_t port, ibv_port_attr* attr) const;
    const char* statusText(ibv_wc_status status) const;
    const char* eventText(ibv_event_type event) const;
};

// Loads libibverbs once per process (never unloaded). The error says why it cannot be
// used: library missing, or a symbol missing (too old an rdma-core).
Result<const VerbsApi*> loadVerbs();

}  // namespace kvxfer::ib
