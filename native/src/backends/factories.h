// Factories of the in-tree backends. Only registry.cc includes this header.
#pragma once

#include <memory>

#include "kvxfer/backend.h"

namespace kvxfer {

Result<std::unique_ptr<Backend>> createLoopbackBackend(const BackendContext& context);
Result<std::unique_ptr<Backend>> createShmBackend(const BackendContext& context);
Status shmAvailability();
#if KVXFER_HAVE_FAULT
Result<std::unique_ptr<Backend>> createFaultBackend(const BackendContext& context);
#endif
#if KVXFER_HAVE_TCP
Result<std::unique_ptr<Backend>> createTcpBackend(const BackendContext& context);
#endif
#if KVXFER_HAVE_CUDA_IPC
Result<std::unique_ptr<Backend>> createCudaIpcBackend(const BackendContext& context);
// OK when the CUDA driver loads and sees a GPU; otherwise why not.
Status cudaIpcAvailability();
#endif
#if KVXFER_HAVE_IBVERBS
Result<std::unique_ptr<Backend>> createIbverbsBackend(const BackendContext& context);
// OK when libibverbs loads and at least one device is present; otherwise why not.
Status ibverbsAvailability();
#endif

}  // namespace kvxfer
