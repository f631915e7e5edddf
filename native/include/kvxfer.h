/* kvxfer C ABI: the engine for programs that are not C++ or Python (and for FFI users
 * such as cffi, ctypes, Rust, Go). Plain C99: opaque handles, integer status codes, no
 * C++ types, no exceptions crossing the boundary. Link with -lkvxfer (libkvxfer.so).
 *
 * Versioning: KVXFER_ABI_VERSION changes whenever a function signature, a struct layout
 * or the meaning of a code changes incompatibly. A program checks at run time that the
 * library it loaded speaks its version:  kvxfer_abi_version() == KVXFER_ABI_VERSION.
 *
 * Errors: every function returning kvxfer_status returns KVXFER_OK or a code; on a code
 * other than KVXFER_OK and KVXFER_PENDING, kvxfer_last_error() returns a message naming
 * what was wrong, kept per thread until the next failing call on that thread.
 *
 * Handles: kvxfer_engine, kvxfer_region, kvxfer_peer and kvxfer_transfer are opaque.
 * Each is released exactly once with its *_release (kvxfer_engine_destroy for engines).
 * The library checks every handle it is given against the live handles of that type:
 * NULL, a released handle or a pointer that is not a handle yields KVXFER_BAD_HANDLE,
 * never a crash (a released address the allocator hands out again for a new handle of
 * the same type is that new handle). Destroying an engine releases every region, peer
 * and transfer handle made from it (they become KVXFER_BAD_HANDLE) and stops its threads
 * before returning: after kvxfer_engine_destroy no kvxfer thread touches its memory.
 *
 * Threads: every function may be called from any thread. Bytes move on the library's
 * own threads: nobody has to poll for progress.
 *
 * Deadlines: every wait takes a timeout in milliseconds; every transfer has a deadline
 * (its timeout, or the engine's default_timeout_ms), by which it ends DONE or FAILED. */
#ifndef KVXFER_H
#define KVXFER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVXFER_ABI_VERSION 1

#if defined(__GNUC__)
#define KVXFER_API __attribute__((visibility("default")))
#else
#define KVXFER_API
#endif

/* ---- status codes ---------------------------------------------------------------- */
typedef int32_t kvxfer_status;
#define KVXFER_OK 0
#define KVXFER_INVALID_ARGUMENT 1 /* caller's fault: bad sizes, bad layout, bad config */
#define KVXFER_OUT_OF_RANGE 2     /* a block id or extent outside its region; buffer too small */
#define KVXFER_NOT_FOUND 3        /* unknown region, peer, backend or config key */
#define KVXFER_UNSUPPORTED 4      /* the backend or build lacks the capability */
#define KVXFER_SYSTEM 5           /* an OS or verbs call failed (the message has errno) */
#define KVXFER_PEER_UNREACHABLE 6 /* the peer is gone */
#define KVXFER_REMOTE 7           /* the peer rejected the operation */
#define KVXFER_TIMEOUT 8          /* a transfer's deadline passed */
#define KVXFER_CANCELED 9         /* canceled, or the engine was closed */
#define KVXFER_BAD_DESCRIPTOR 10  /* malformed, truncated or incompatible peer metadata */
#define KVXFER_INTERNAL 11        /* a kvxfer bug */
#define KVXFER_PENDING 100        /* not an error: a wait ended before the transfer or note */
#define KVXFER_BAD_HANDLE 101     /* NULL, released, or not a handle of that type */
#define KVXFER_OTHER 102          /* a core error this ABI version has no code for */

/* The constant's name without the prefix ("TIMEOUT"), or "UNKNOWN". Never NULL. */
KVXFER_API const char* kvxfer_status_name(kvxfer_status code);
/* The message of this thread's last failing call ("" if none). Valid until the next
 * call into the library on this thread. */
KVXFER_API const char* kvxfer_last_error(void);

/* ---- versions --------------------------------------------------------------------- */
KVXFER_API int32_t kvxfer_abi_version(void); /* KVXFER_ABI_VERSION of the loaded library */
KVXFER_API const char* kvxfer_version(void); /* the library's release, e.g. "0.2.0" */

/* ---- handles ---------------------------------------------------------------------- */
typedef struct kvxfer_engine kvxfer_engine;
typedef struct kvxfer_region kvxfer_region;
typedef struct kvxfer_peer kvxfer_peer;
typedef struct kvxfer_transfer kvxfer_transfer;

/* ---- engine ----------------------------------------------------------------------- */
/* `config`: "key=value" entries, one per line, or separated by ';' when the text has no
 * newline (a value holding ';', like fault.script, needs lines). NULL or "" = defaults.
 * Keys: name, backends (comma list, in order of preference, e.g. "shm,tcp"),
 * default_timeout_ms, connect_timeout_ms, and every backend field of the environment
 * overlay by its field name, e.g. tcp.listen=127.0.0.1:0, shm.threads=2,
 * ibverbs.device=rxe0 (docs/api.md lists them; the KVXFER_* environment still wins).
 * An unknown key is KVXFER_NOT_FOUND, a bad value KVXFER_INVALID_ARGUMENT. */
KVXFER_API kvxfer_status kvxfer_engine_create(const char* config, kvxfer_engine** out);
/* Closes the engine: in-flight transfers end CANCELED, new work is refused, and every
 * thread of the engine has ended when it returns. Idempotent. */
KVXFER_API kvxfer_status kvxfer_engine_close(kvxfer_engine* engine);
/* Closes the engine (in-flight transfers end CANCELED, the canceled transfers let go of
 * registered memory, the engine's threads end) and releases its handle and every region,
 * peer and transfer handle made from it. */
KVXFER_API kvxfer_status kvxfer_engine_destroy(kvxfer_engine* engine);
/* Copies the engine's name, NUL-terminated, into buf (cap bytes); *len = its length
 * without the NUL. buf may be NULL to ask the length; too small = KVXFER_OUT_OF_RANGE. */
KVXFER_API kvxfer_status kvxfer_engine_name(kvxfer_engine* engine, char* buf, size_t cap, size_t* len);
/* The started backends, comma-separated, same buffer rules as kvxfer_engine_name. */
KVXFER_API kvxfer_status kvxfer_engine_backends(kvxfer_engine* engine, char* buf, size_t cap, size_t* len);
/* An eventfd that becomes readable when a notification arrives (for event loops); it
 * stays readable until kvxfer_engine_drain_completion_fd. Do not close it. */
KVXFER_API kvxfer_status kvxfer_engine_completion_fd(kvxfer_engine* engine, int* fd);
KVXFER_API kvxfer_status kvxfer_engine_drain_completion_fd(kvxfer_engine* engine);

/* ---- memory ----------------------------------------------------------------------- */
/* Geometry of a paged KV cache inside a region; zero strides take the dense layer-major
 * defaults [layer][kv][block][block_bytes] (see native/include/kvxfer/plan.h). */
typedef struct kvxfer_kv_layout {
    uint32_t num_layers; /* >= 1 */
    uint32_t num_kv;     /* 1 or 2 */
    uint64_t num_blocks;
    uint64_t block_bytes;
    uint64_t block_stride;
    uint64_t kv_stride;
    uint64_t layer_stride;
    uint64_t offset;
} kvxfer_kv_layout;

/* Page-aligned, zeroed host memory a same-host peer can map (the shm backend's one-copy
 * path). Any other host memory also works (cross-memory attach). */
KVXFER_API kvxfer_status kvxfer_alloc_shareable(uint64_t nbytes, void** out);
KVXFER_API kvxfer_status kvxfer_free_shareable(void* ptr);

/* Registers [base, base+nbytes) of host memory with every backend; `layout` (may be
 * NULL) enables block-id transfers on it. The memory must outlive the region handle and
 * every transfer that uses it. */
KVXFER_API kvxfer_status kvxfer_register(kvxfer_engine* engine, void* base, uint64_t nbytes,
                                         const kvxfer_kv_layout* layout, kvxfer_region** out);
/* Stops publishing the region (peers that import it afterwards do not see it) and
 * releases the handle; in-flight transfers keep the registration until they end. */
KVXFER_API kvxfer_status kvxfer_deregister(kvxfer_engine* engine, kvxfer_region* region);
KVXFER_API kvxfer_status kvxfer_region_id(kvxfer_region* region, uint32_t* id);

/* ---- peers ------------------------------------------------------------------------ */
/* The engine's descriptor (what a peer passes to kvxfer_add_peer), same buffer rules as
 * kvxfer_engine_name but binary: *len is its size. Its size grows with regions, not
 * blocks. */
KVXFER_API kvxfer_status kvxfer_engine_descriptor(kvxfer_engine* engine, uint8_t* buf, size_t cap,
                                                  size_t* len);
/* Imports a peer's descriptor (connects; bounded by connect_timeout_ms per backend). A
 * known instance is refreshed; a restarted one replaces the old. */
KVXFER_API kvxfer_status kvxfer_add_peer(kvxfer_engine* engine, const uint8_t* descriptor, size_t len,
                                         kvxfer_peer** out);
KVXFER_API kvxfer_status kvxfer_peer_release(kvxfer_peer* peer);
KVXFER_API kvxfer_status kvxfer_peer_name(kvxfer_peer* peer, char* buf, size_t cap, size_t* len);
KVXFER_API kvxfer_status kvxfer_peer_backend(kvxfer_peer* peer, char* buf, size_t cap, size_t* len);

typedef struct kvxfer_remote_region {
    uint32_t id;
    uint32_t has_layout; /* 0 or 1 */
    uint64_t nbytes;
    kvxfer_kv_layout layout;
} kvxfer_remote_region;
/* The peer's regions in registration order: *count gets how many exist; up to cap are
 * copied into out (which may be NULL when cap is 0). */
KVXFER_API kvxfer_status kvxfer_peer_regions(kvxfer_peer* peer, kvxfer_remote_region* out, size_t cap,
                                             size_t* count);

/* ---- transfers -------------------------------------------------------------------- */
#define KVXFER_OP_WRITE 0 /* local -> remote */
#define KVXFER_OP_READ 1  /* remote -> local */

#define KVXFER_SIDE_BLOCKS 0
#define KVXFER_SIDE_EXTENTS 1

typedef struct kvxfer_extent {
    uint64_t offset;
    uint64_t length;
} kvxfer_extent;

/* One side of a part: block ids of the region's layout (optionally layers
 * [layer_begin, layer_end), layer_end 0 = all), or byte extents. Arrays are read during
 * kvxfer_post only. */
typedef struct kvxfer_side {
    uint32_t kind; /* KVXFER_SIDE_BLOCKS or KVXFER_SIDE_EXTENTS */
    uint32_t layer_begin;
    uint32_t layer_end;
    uint32_t reserved; /* 0 */
    const int64_t* block_ids;
    size_t num_block_ids;
    const kvxfer_extent* extents;
    size_t num_extents;
} kvxfer_side;

/* One part: bytes of one local region to or from one region of the peer. The local
 * byte stream (blocks in (layer, kv, list position) order, extents in list order) lands
 * on the remote byte stream in the same order; both totals must be equal. */
typedef struct kvxfer_part {
    kvxfer_region* local;
    uint32_t remote_region; /* an id from kvxfer_peer_regions */
    uint32_t reserved;      /* 0 */
    kvxfer_side local_side;
    kvxfer_side remote_side;
} kvxfer_part;

#define KVXFER_POST_NO_COALESCE 1u /* flags: move every piece as its own run */

/* Posts one transfer of num_parts parts (0 = a notification-only transfer) with one
 * deadline (timeout_ms; 0 = the engine's default) and one notification (notify_len 0 =
 * none) that reaches the peer after every byte. Everything is validated before a byte
 * moves: a bad request returns its code and no transfer. */
KVXFER_API kvxfer_status kvxfer_post(kvxfer_engine* engine, kvxfer_peer* peer, int32_t op,
                                     const kvxfer_part* parts, size_t num_parts, const uint8_t* notify,
                                     size_t notify_len, int64_t timeout_ms, uint32_t flags,
                                     kvxfer_transfer** out);

#define KVXFER_STATE_PENDING 0
#define KVXFER_STATE_DONE 1
#define KVXFER_STATE_FAILED 2

/* Waits until the transfer ends or timeout_ms passes (0 = poll, < 0 = until the
 * transfer's own deadline, which always ends it). Returns KVXFER_OK (DONE), KVXFER_PENDING
 * (timeout_ms came first), or the failure's code with its message in kvxfer_last_error. */
KVXFER_API kvxfer_status kvxfer_transfer_wait(kvxfer_transfer* transfer, int64_t timeout_ms);
/* The state without blocking (applies the deadline). */
KVXFER_API kvxfer_status kvxfer_transfer_state(kvxfer_transfer* transfer, int32_t* state);
/* Requests cancellation; *canceled = 1 if this call ended it (FAILED, KVXFER_CANCELED).
 * A transfer whose notification is already on its way cannot be canceled. */
KVXFER_API kvxfer_status kvxfer_transfer_cancel(kvxfer_transfer* transfer, int32_t* canceled);
KVXFER_API kvxfer_status kvxfer_transfer_id(kvxfer_transfer* transfer, uint64_t* id);
/* Bytes the transfer moves in all (from its plan). */
KVXFER_API kvxfer_status kvxfer_transfer_bytes(kvxfer_transfer* transfer, uint64_t* bytes);
/* Releases the handle; a pending transfer continues to its end. */
KVXFER_API kvxfer_status kvxfer_transfer_release(kvxfer_transfer* transfer);

/* ---- notifications ---------------------------------------------------------------- */
/* Sends `payload` alone to the peer (after every byte of transfers already posted to it
 * on the same backend connection). */
KVXFER_API kvxfer_status kvxfer_notify(kvxfer_engine* engine, kvxfer_peer* peer, const uint8_t* payload,
                                       size_t len, int64_t timeout_ms);

/* A received notification. The pointers belong to the library until
 * kvxfer_notification_free. */
typedef struct kvxfer_notification {
    const char* peer_name; /* NUL-terminated */
    uint64_t peer_instance;
    const uint8_t* payload;
    size_t payload_len;
    void* internal_; /* do not touch */
} kvxfer_notification;

/* Takes the oldest received notification whose payload equals key[0..key_len) (key NULL
 * = any), waiting up to timeout_ms (>= 0). Notifications with other keys stay queued for
 * their own waiters, across threads. KVXFER_OK fills *out; KVXFER_PENDING = none came. */
KVXFER_API kvxfer_status kvxfer_wait_notification(kvxfer_engine* engine, const uint8_t* key, size_t key_len,
                                                  int64_t timeout_ms, kvxfer_notification* out);
KVXFER_API void kvxfer_notification_free(kvxfer_notification* note);

#ifdef __cplusplus
}
#endif

#endif /* KVXFER_H */
