/* A prefill process writes one request's KV into a decode process's paged pool through
 * the kvxfer C ABI, with one multi-region transfer and one notification; the decode
 * checks every byte. Two processes: the program forks before either creates an engine,
 * and the descriptors travel over pipes (any channel works: they are plain bytes).
 *
 *   kvxfer_c_example [shm|tcp]      exit status 0 = the bytes arrived intact */
#define _POSIX_C_SOURCE 200809L
#include <kvxfer.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define LAYERS 4 /* regions: one per layer for K and one for V */
#define REGIONS (2 * LAYERS)
#define BLOCKS 64
#define BLOCK_BYTES 4096
#define MOVED 12

static const int64_t prefill_blocks[MOVED] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
static const int64_t decode_blocks[MOVED] = {40, 41, 42, 43, 7, 8, 9, 10, 11, 12, 13, 63};

#define CHECK(call)                                                                                      \
    do {                                                                                                 \
        kvxfer_status st_ = (call);                                                                      \
        if (st_ != KVXFER_OK) {                                                                          \
            fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call, kvxfer_status_name(st_), \
                    kvxfer_last_error());                                                                \
            exit(1);                                                                                     \
        }                                                                                                \
    } while (0)

static unsigned char pattern(int region, int64_t block, size_t i) {
    return (unsigned char)(region * 31 + block * 7 + i * 13 + 1);
}

static void write_all(int fd, const void* p, size_t n) {
    const unsigned char* c = p;
    while (n > 0) {
        ssize_t w = write(fd, c, n);
        if (w <= 0) {
            perror("write");
            exit(1);
        }
        c += w;
        n -= (size_t)w;
    }
}

static void read_all(int fd, void* p, size_t n) {
    unsigned char* c = p;
    while (n > 0) {
        ssize_t r = read(fd, c, n);
        if (r <= 0) {
            fprintf(stderr, "read: the other process went away\n");
            exit(1);
        }
        c += r;
        n -= (size_t)r;
    }
}

static void send_descriptor(kvxfer_engine* e, int fd) {
    size_t len = 0;
    CHECK(kvxfer_engine_descriptor(e, NULL, 0, &len));
    uint8_t* d = malloc(len);
    CHECK(kvxfer_engine_descriptor(e, d, len, &len));
    uint64_t n = len;
    write_all(fd, &n, sizeof n);
    write_all(fd, d, len);
    free(d);
}

static kvxfer_peer* receive_peer(kvxfer_engine* e, int fd) {
    uint64_t n = 0;
    read_all(fd, &n, sizeof n);
    uint8_t* d = malloc(n);
    read_all(fd, d, n);
    kvxfer_peer* peer = NULL;
    CHECK(kvxfer_add_peer(e, d, n, &peer));
    free(d);
    return peer;
}

static kvxfer_engine* make_engine(const char* name, const char* backend) {
    char config[128];
    snprintf(config, sizeof config, "name=%s; backends=%s; tcp.listen=127.0.0.1:0; default_timeout_ms=20000",
             name, backend);
    kvxfer_engine* e = NULL;
    CHECK(kvxfer_engine_create(config, &e));
    return e;
}

/* The decode side: registers its pool, publishes its descriptor, waits for the note. */
static int decode(const char* backend, int to_prefill, int from_prefill) {
    kvxfer_engine* e = make_engine("decode", backend);
    kvxfer_kv_layout layout = {1, 1, BLOCKS, BLOCK_BYTES, 0, 0, 0, 0};
    void* pools[REGIONS];
    kvxfer_region* regions[REGIONS];
    for (int r = 0; r < REGIONS; ++r) {
        CHECK(kvxfer_alloc_shareable(BLOCKS * BLOCK_BYTES, &pools[r]));
        CHECK(kvxfer_register(e, pools[r], BLOCKS * BLOCK_BYTES, &layout, &regions[r]));
    }
    send_descriptor(e, to_prefill);

    kvxfer_notification note;
    CHECK(kvxfer_wait_notification(e, (const uint8_t*)"req-17", 6, 30000, &note));
    int bad = 0;
    for (int r = 0; r < REGIONS; ++r) {
        const unsigned char* pool = pools[r];
        for (int k = 0; k < MOVED; ++k) {
            const unsigned char* block = pool + decode_blocks[k] * BLOCK_BYTES;
            for (size_t i = 0; i < BLOCK_BYTES; ++i) bad += block[i] != pattern(r, prefill_blocks[k], i);
        }
    }
    printf("decode: notification '%.*s' from %s; %d of %d regions x %d blocks checked, %d bad bytes\n",
           (int)note.payload_len, (const char*)note.payload, note.peer_name, REGIONS, REGIONS, MOVED, bad);
    kvxfer_notification_free(&note);
    /* The notification can reach this process before the prefill has its acknowledgement:
     * keep the engine serving until the prefill says its transfer ended (or exits). */
    char done;
    if (read(from_prefill, &done, 1) < 0) perror("read");
    for (int r = 0; r < REGIONS; ++r) {
        CHECK(kvxfer_deregister(e, regions[r]));
        CHECK(kvxfer_free_shareable(pools[r]));
    }
    CHECK(kvxfer_engine_destroy(e));
    return bad == 0 ? 0 : 1;
}

/* The prefill side: fills its KV, imports the decode, posts one transfer of 8 parts. */
static int prefill(const char* backend, int from_decode, int to_decode) {
    kvxfer_engine* e = make_engine("prefill", backend);
    kvxfer_kv_layout layout = {1, 1, BLOCKS, BLOCK_BYTES, 0, 0, 0, 0};
    unsigned char* kv[REGIONS];
    kvxfer_region* regions[REGIONS];
    for (int r = 0; r < REGIONS; ++r) {
        kv[r] = malloc(BLOCKS * BLOCK_BYTES); /* ordinary memory works too */
        for (int64_t b = 0; b < BLOCKS; ++b)
            for (size_t i = 0; i < BLOCK_BYTES; ++i) kv[r][b * BLOCK_BYTES + i] = pattern(r, b, i);
        CHECK(kvxfer_register(e, kv[r], BLOCKS * BLOCK_BYTES, &layout, &regions[r]));
    }
    kvxfer_peer* peer = receive_peer(e, from_decode);
    kvxfer_remote_region remote[REGIONS];
    size_t count = 0;
    CHECK(kvxfer_peer_regions(peer, remote, REGIONS, &count));
    if (count != REGIONS) {
        fprintf(stderr, "prefill: the decode published %zu regions, expected %d\n", count, REGIONS);
        return 1;
    }
    kvxfer_part parts[REGIONS];
    memset(parts, 0, sizeof parts);
    for (int r = 0; r < REGIONS; ++r) {
        parts[r].local = regions[r];
        parts[r].remote_region = remote[r].id;
        parts[r].local_side.kind = KVXFER_SIDE_BLOCKS;
        parts[r].local_side.block_ids = prefill_blocks;
        parts[r].local_side.num_block_ids = MOVED;
        parts[r].remote_side.kind = KVXFER_SIDE_BLOCKS;
        parts[r].remote_side.block_ids = decode_blocks;
        parts[r].remote_side.num_block_ids = MOVED;
    }
    kvxfer_transfer* t = NULL;
    CHECK(kvxfer_post(e, peer, KVXFER_OP_WRITE, parts, REGIONS, (const uint8_t*)"req-17", 6, 10000, 0, &t));
    CHECK(kvxfer_transfer_wait(t, 15000));
    write_all(to_decode, "d", 1); /* the decode may close its engine now */
    uint64_t bytes = 0;
    CHECK(kvxfer_transfer_bytes(t, &bytes));
    char via[32];
    size_t len = 0;
    CHECK(kvxfer_peer_backend(peer, via, sizeof via, &len));
    printf("prefill: wrote %llu bytes in one transfer of %d parts via %s\n", (unsigned long long)bytes,
           REGIONS, via);
    CHECK(kvxfer_transfer_release(t));
    CHECK(kvxfer_peer_release(peer));
    for (int r = 0; r < REGIONS; ++r) CHECK(kvxfer_deregister(e, regions[r]));
    CHECK(kvxfer_engine_destroy(e));
    for (int r = 0; r < REGIONS; ++r) free(kv[r]);
    return 0;
}

int main(int argc, char** argv) {
    const char* backend = argc > 1 ? argv[1] : "shm";
    if (kvxfer_abi_version() != KVXFER_ABI_VERSION) {
        fprintf(stderr, "libkvxfer speaks ABI %d, this program was built for %d\n", (int)kvxfer_abi_version(),
                KVXFER_ABI_VERSION);
        return 1;
    }
    printf("libkvxfer %s, ABI %d, backend %s\n", kvxfer_version(), (int)kvxfer_abi_version(), backend);
    fflush(stdout);
    int pipefd[2], donefd[2]; /* decode -> prefill: descriptor; prefill -> decode: done */
    if (pipe(pipefd) != 0 || pipe(donefd) != 0) {
        perror("pipe");
        return 1;
    }
    pid_t child = fork(); /* before any engine exists: each process makes its own */
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0) {
        close(pipefd[0]);
        close(donefd[1]);
        int rc = decode(backend, pipefd[1], donefd[0]);
        fflush(stdout);
        _exit(rc);
    }
    close(pipefd[1]);
    close(donefd[0]);
    int rc = prefill(backend, pipefd[0], donefd[1]);
    close(donefd[1]); /* also wakes the decode if the prefill failed before writing */
    int status = 0;
    if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "the decode process failed\n");
        return 1;
    }
    return rc;
}
