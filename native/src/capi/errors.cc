// The C ABI's error channel and versions: status names, the per-thread last error, the
// core Status -> code mapping, and the handle tables.
#include <cstdio>
#include <cstring>

#include "handles.h"

namespace kvxfer::capi {
namespace {

thread_local std::string last_error;

}  // namespace

// The tables are never destroyed: handles a program still holds at exit must not be
// released by static destructors, which run in no defined order against the core's own
// statics (a region's release would reach backends already torn down).
HandleTable<kvxfer_engine>& engines() {
    static auto* t = new HandleTable<kvxfer_engine>();  // immortal: see the note above
    return *t;
}
HandleTable<kvxfer_region>& regions() {
    static auto* t = new HandleTable<kvxfer_region>();  // immortal: see the note above
    return *t;
}
HandleTable<kvxfer_peer>& peers() {
    static auto* t = new HandleTable<kvxfer_peer>();  // immortal: see the note above
    return *t;
}
HandleTable<kvxfer_transfer>& transfers() {
    static auto* t = new HandleTable<kvxfer_transfer>();  // immortal: see the note above
    return *t;
}

kvxfer_status fail(kvxfer_status code, std::string message) {
    last_error = std::move(message);
    return code;
}

kvxfer_status fromStatus(const Status& status) {
    // Explicit, so that a code added to the core later maps to KVXFER_OTHER instead of
    // silently shifting the numbers of this ABI.
    kvxfer_status code = KVXFER_OTHER;
    switch (status.code()) {
        case StatusCode::kOk:
            return KVXFER_OK;
        case StatusCode::kInvalidArgument:
            code = KVXFER_INVALID_ARGUMENT;
            break;
        case StatusCode::kOutOfRange:
            code = KVXFER_OUT_OF_RANGE;
            break;
        case StatusCode::kNotFound:
            code = KVXFER_NOT_FOUND;
            break;
        case StatusCode::kUnsupported:
            code = KVXFER_UNSUPPORTED;
            break;
        case StatusCode::kSystem:
            code = KVXFER_SYSTEM;
            break;
        case StatusCode::kPeerUnreachable:
            code = KVXFER_PEER_UNREACHABLE;
            break;
        case StatusCode::kRemote:
            code = KVXFER_REMOTE;
            break;
        case StatusCode::kTimeout:
            code = KVXFER_TIMEOUT;
            break;
        case StatusCode::kCanceled:
            code = KVXFER_CANCELED;
            break;
        case StatusCode::kBadDescriptor:
            code = KVXFER_BAD_DESCRIPTOR;
            break;
        case StatusCode::kInternal:
            code = KVXFER_INTERNAL;
            break;
        default:
            return fail(KVXFER_OTHER, status.toString());
    }
    return fail(code, status.message());
}

kvxfer_status badHandle(const char* type, const void* raw) {
    if (raw == nullptr) return fail(KVXFER_BAD_HANDLE, std::string(type) + " handle is NULL");
    char addr[32];
    std::snprintf(addr, sizeof addr, "%p", raw);
    return fail(KVXFER_BAD_HANDLE, std::string(addr) + " is not a live " + type + " handle");
}

kvxfer_status copyOut(const std::string& text, bool nul, void* buf, size_t cap, size_t* len,
                      const char* what) {
    if (len == nullptr) return fail(KVXFER_INVALID_ARGUMENT, "len must not be NULL");
    *len = text.size();
    if (buf == nullptr && cap == 0) return KVXFER_OK;  // a size query
    if (buf == nullptr) return fail(KVXFER_INVALID_ARGUMENT, std::string(what) + ": buf is NULL but cap > 0");
    const size_t need = text.size() + (nul ? 1 : 0);
    if (cap < need) {
        return fail(KVXFER_OUT_OF_RANGE, std::string(what) + " needs " + std::to_string(need) +
                                             " bytes, the buffer has " + std::to_string(cap));
    }
    std::memcpy(buf, text.data(), text.size());
    if (nul) static_cast<char*>(buf)[text.size()] = '\0';
    return KVXFER_OK;
}

}  // namespace kvxfer::capi

extern "C" {

const char* kvxfer_status_name(kvxfer_status code) {
    switch (code) {
        case KVXFER_OK:
            return "OK";
        case KVXFER_INVALID_ARGUMENT:
            return "INVALID_ARGUMENT";
        case KVXFER_OUT_OF_RANGE:
            return "OUT_OF_RANGE";
        case KVXFER_NOT_FOUND:
            return "NOT_FOUND";
        case KVXFER_UNSUPPORTED:
            return "UNSUPPORTED";
        case KVXFER_SYSTEM:
            return "SYSTEM";
        case KVXFER_PEER_UNREACHABLE:
            return "PEER_UNREACHABLE";
        case KVXFER_REMOTE:
            return "REMOTE";
        case KVXFER_TIMEOUT:
            return "TIMEOUT";
        case KVXFER_CANCELED:
            return "CANCELED";
        case KVXFER_BAD_DESCRIPTOR:
            return "BAD_DESCRIPTOR";
        case KVXFER_INTERNAL:
            return "INTERNAL";
        case KVXFER_PENDING:
            return "PENDING";
        case KVXFER_BAD_HANDLE:
            return "BAD_HANDLE";
        case KVXFER_OTHER:
            return "OTHER";
        default:
            return "UNKNOWN";
    }
}

const char* kvxfer_last_error(void) { return kvxfer::capi::last_error.c_str(); }

int32_t kvxfer_abi_version(void) { return KVXFER_ABI_VERSION; }

const char* kvxfer_version(void) { return KVXFER_VERSION_STRING; }

}  // extern "C"
