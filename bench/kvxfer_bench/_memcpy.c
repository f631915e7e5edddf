/* kvxfer-bench's memcpy baseline: copies a list of pieces (dst offset, src offset,
 * length) between two buffers of this process with glibc memcpy, on up to N threads of
 * a persistent pool, so that neither Python's per-piece overhead nor thread creation is
 * part of the measurement.
 *
 * The byte stream (the pieces in order) is cut into `parts` equal byte ranges (a piece
 * may be split between two parts); the caller copies part 0 and workers 1..parts-1 copy
 * the others. A copy smaller than 2 x min_part_bytes runs on the calling thread alone.
 *
 * Built by kvxfer_bench/baselines.py with `cc -O2 -shared -fPIC -pthread`, loaded with
 * ctypes (which releases the GIL around the call). Not thread-safe between callers:
 * one copy at a time (serialised by call_mu).
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define KVX_MAX_THREADS 256

typedef struct {
    uint8_t* dst;
    const uint8_t* src;
    const uint64_t* dst_off;
    const uint64_t* src_off;
    const uint64_t* prefix; /* n + 1 exclusive prefix sums of the lengths */
    uint64_t n;
    uint64_t total;
    int parts;
} job_t;

static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t start_cv = PTHREAD_COND_INITIALIZER;
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;
static int nworkers = 0;
static uint64_t generation = 0;
static int outstanding = 0;
static job_t current;
static uint64_t start_gen[KVX_MAX_THREADS]; /* generation when worker i was created */

static uint64_t part_begin(const job_t* j, int k) {
    uint64_t b = (j->total / (uint64_t)j->parts) * (uint64_t)k;
    return b & ~(uint64_t)63;
}

static uint64_t part_end(const job_t* j, int k) {
    return k + 1 == j->parts ? j->total : part_begin(j, k + 1);
}

static void copy_range(const job_t* j, uint64_t a, uint64_t b) {
    if (a >= b) return;
    uint64_t lo = 0, hi = j->n; /* largest i with prefix[i] <= a */
    while (hi - lo > 1) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (j->prefix[mid] <= a) lo = mid; else hi = mid;
    }
    uint64_t i = lo;
    while (a < b && i < j->n) {
        uint64_t piece_end = j->prefix[i + 1];
        uint64_t inner = a - j->prefix[i];
        uint64_t stop = piece_end < b ? piece_end : b;
        if (stop > a) memcpy(j->dst + j->dst_off[i] + inner, j->src + j->src_off[i] + inner, stop - a);
        a = stop;
        ++i;
    }
}

static void* worker_main(void* arg) {
    int idx = (int)(intptr_t)arg;
    pthread_mutex_lock(&mu);
    uint64_t seen = start_gen[idx];
    for (;;) {
        while (generation == seen) pthread_cond_wait(&start_cv, &mu);
        seen = generation;
        job_t j = current;
        pthread_mutex_unlock(&mu);
        if (idx < j.parts) copy_range(&j, part_begin(&j, idx), part_end(&j, idx));
        pthread_mutex_lock(&mu);
        if (--outstanding == 0) pthread_cond_signal(&done_cv);
    }
    return 0;
}

/* Starts workers until there are threads - 1 of them. Returns the number of workers. */
int kvx_memcpy_init(int threads) {
    pthread_mutex_lock(&call_mu);
    pthread_mutex_lock(&mu);
    while (nworkers + 1 < threads && nworkers + 1 < KVX_MAX_THREADS) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        start_gen[nworkers + 1] = generation;
        if (pthread_create(&t, &attr, worker_main, (void*)(intptr_t)(nworkers + 1)) != 0) {
            pthread_attr_destroy(&attr);
            break;
        }
        pthread_attr_destroy(&attr);
        ++nworkers;
    }
    int n = nworkers;
    pthread_mutex_unlock(&mu);
    pthread_mutex_unlock(&call_mu);
    return n;
}

/* Copies pieces i = 0..n-1: dst[dst_off[i] .. +len_i] = src[src_off[i] .. +len_i] where
 * len_i = prefix[i+1] - prefix[i]. Returns the number of threads used. */
int kvx_memcpy_pieces(uint8_t* dst, const uint8_t* src, const uint64_t* dst_off, const uint64_t* src_off,
                      const uint64_t* prefix, uint64_t n, int threads, uint64_t min_part_bytes) {
    if (n == 0) return 0;
    pthread_mutex_lock(&call_mu);
    job_t j = {dst, src, dst_off, src_off, prefix, n, prefix[n], 1};
    int max_parts = threads < nworkers + 1 ? threads : nworkers + 1;
    if (max_parts < 1) max_parts = 1;
    uint64_t by_size = min_part_bytes ? j.total / min_part_bytes : (uint64_t)max_parts;
    j.parts = by_size < (uint64_t)max_parts ? (int)(by_size ? by_size : 1) : max_parts;
    if (j.parts == 1) {
        copy_range(&j, 0, j.total);
    } else {
        pthread_mutex_lock(&mu);
        current = j;
        outstanding = nworkers;
        ++generation;
        pthread_cond_broadcast(&start_cv);
        pthread_mutex_unlock(&mu);
        copy_range(&j, part_begin(&j, 0), part_end(&j, 0));
        pthread_mutex_lock(&mu);
        while (outstanding > 0) pthread_cond_wait(&done_cv, &mu);
        pthread_mutex_unlock(&mu);
    }
    pthread_mutex_unlock(&call_mu);
    return j.parts;
}
