/* The single CRC32C dispatch point: probe the CPU once, keep the best kernel, and build the public
 * functions (inversion, combine, chunked and parallel checksums) on top of it. */
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include "../include/thaw.h"
#include "crc32c_impl.h"
#include "pool.h"

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static void init(void);

/* ---- polynomial arithmetic mod P (reflected: bit 31 is x^0) ---- */

static uint32_t mulmod(uint32_t a, uint32_t b) {
    uint32_t product = 0;
    for (uint32_t m = 1u << 31; m; m >>= 1) {
        if (a & m) product ^= b;
        b = (b >> 1) ^ (CRC32C_POLY & (0u - (b & 1)));
    }
    return product;
}

static uint32_t x_2_to_the[64]; /* x^(2^k) mod P */

static void powers_init(void) {
    x_2_to_the[0] = 1u << 30; /* x^1 */
    for (int k = 1; k < 64; k++) x_2_to_the[k] = mulmod(x_2_to_the[k - 1], x_2_to_the[k - 1]);
}

uint32_t crc32c_xpow(uint64_t n) {
    uint32_t result = 1u << 31; /* x^0 */
    for (int k = 0; n; n >>= 1, k++)
        if (n & 1) result = mulmod(x_2_to_the[k], result);
    return result;
}

uint32_t thaw_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
    pthread_once(&init_once, init);
    return mulmod(crc32c_xpow(8 * len_b), crc_a) ^ crc_b;
}

/* ---- dispatch ---- */

typedef struct {
    const char *name;
    crc32c_kernel kernel;
    int usable;
} impl;

/* Best first. */
static impl impls[] = {
#if defined(__x86_64__) || defined(_M_X64)
    {"avx512-vpclmulqdq", crc32c_avx512_vpclmul, 0},
    {"avx2-vpclmulqdq", crc32c_avx2_vpclmul, 0},
    {"sse42", crc32c_sse42, 0},
#endif
#if defined(__aarch64__)
    {"armv8-crc", crc32c_armv8, 0},
#endif
    {"software", crc32c_sw, 1},
};
enum { N_IMPLS = sizeof impls / sizeof impls[0] };

static _Atomic(const impl *) active;
static char available[128];

static void set_usable(const char *name, int usable) {
    for (int i = 0; i < N_IMPLS; i++)
        if (strcmp(impls[i].name, name) == 0) impls[i].usable = usable;
}

static void init(void) {
    powers_init();
    crc32c_sw_init();
#if defined(__x86_64__) || defined(_M_X64)
    unsigned f = cpu_x86_features();
    int sse42 = (f & CPU_SSE42) && (f & CPU_PCLMUL);
    if (sse42) crc32c_sse42_init();
    if (sse42 && (f & CPU_AVX2_VPCLMUL)) crc32c_avx2_vpclmul_init();
    if (sse42 && (f & CPU_AVX512_VPCLMUL)) crc32c_avx512_vpclmul_init();
    set_usable("sse42", sse42);
    set_usable("avx2-vpclmulqdq", sse42 && (f & CPU_AVX2_VPCLMUL));
    set_usable("avx512-vpclmulqdq", sse42 && (f & CPU_AVX512_VPCLMUL));
#endif
#if defined(__aarch64__)
    set_usable("armv8-crc", cpu_arm64_has_crc());
#endif
    for (int i = N_IMPLS - 1; i >= 0; i--)
        if (impls[i].usable) atomic_store(&active, &impls[i]);
    for (int i = 0; i < N_IMPLS; i++) {
        if (!impls[i].usable) continue;
        if (available[0]) strcat(available, ",");
        strcat(available, impls[i].name);
    }
}

static crc32c_kernel kernel(void) {
    pthread_once(&init_once, init);
    return atomic_load_explicit(&active, memory_order_relaxed)->kernel;
}

const char *thaw_crc32c_impl(void) {
    pthread_once(&init_once, init);
    return atomic_load(&active)->name;
}

const char *thaw_crc32c_available(void) {
    pthread_once(&init_once, init);
    return available;
}

int thaw_crc32c_select(const char *name) {
    pthread_once(&init_once, init);
    for (int i = 0; i < N_IMPLS; i++)
        if (impls[i].usable && strcmp(impls[i].name, name) == 0) {
            atomic_store(&active, &impls[i]);
            return 0;
        }
    return -1;
}

/* The folding copy goes with the vector-folding kernels (AVX-512 CPUs run the AVX2 one); a CPU without them, or
 * a test that selected another kernel, gets none. */
crc32c_fold_rows_fn crc32c_fold_rows(void) {
#if defined(__x86_64__) || defined(_M_X64)
    crc32c_kernel k = kernel();
    int avx2 = 0;
    for (int i = 0; i < N_IMPLS; i++)
        if (strcmp(impls[i].name, "avx2-vpclmulqdq") == 0) avx2 = impls[i].usable;
    if (avx2 && (k == crc32c_avx2_vpclmul || k == crc32c_avx512_vpclmul)) return crc32c_avx2_fold_rows;
#endif
    return NULL;
}

#if defined(__x86_64__) || defined(_M_X64)
int crc32c_folds_512(void) { return kernel() == crc32c_avx512_vpclmul; }
#endif

void crc32c_fold_start(crc32c_fold *f, uint32_t raw) {
    memset(f, 0, sizeof *f);
    f->raw = raw;
}

uint32_t crc32c_fold_end(const crc32c_fold *f) {
#if defined(__x86_64__) || defined(_M_X64)
    if (f->started) return crc32c_avx2_fold_end(f);
#endif
    return f->raw;
}

uint32_t thaw_crc32c(uint32_t crc, const void *data, size_t len) {
    return ~kernel()(~crc, (const uint8_t *)data, len);
}

/* ---- chunked and parallel checksums ---- */

enum { TASK_BYTES = 1 << 20, PARALLEL_MIN = 4 << 20 };

enum { COPY_BLOCK = 128 << 10 }; /* copied, then checksummed while it is still in the core's cache */

typedef struct {
    const uint8_t *data;
    size_t len, chunk_size, chunks_per_task;
    uint32_t *out;
    uint8_t *copy_to; /* thaw_copy_chunk_crcs: the chunks are copied here and their copies checksummed */
} chunk_job;

static void chunk_task(void *ctx, size_t index, int worker) {
    (void)worker;
    chunk_job *job = ctx;
    crc32c_kernel k = kernel();
    size_t first = index * job->chunks_per_task;
    size_t n_chunks = (job->len + job->chunk_size - 1) / job->chunk_size;
    size_t last = first + job->chunks_per_task < n_chunks ? first + job->chunks_per_task : n_chunks;
    for (size_t c = first; c < last; c++) {
        size_t start = c * job->chunk_size;
        size_t n = job->len - start < job->chunk_size ? job->len - start : job->chunk_size;
        if (!job->copy_to) {
            job->out[c] = ~k(~0u, job->data + start, n);
            continue;
        }
        uint32_t crc = ~0u;
        for (size_t at = start; at < start + n; at += COPY_BLOCK) {
            size_t m = start + n - at < COPY_BLOCK ? start + n - at : COPY_BLOCK;
            memcpy(job->copy_to + at, job->data + at, m);
            crc = k(crc, job->copy_to + at, m);
        }
        job->out[c] = ~crc;
    }
}

static void run_chunks(chunk_job *job) {
    size_t n_chunks = (job->len + job->chunk_size - 1) / job->chunk_size;
    job->chunks_per_task = job->chunk_size >= TASK_BYTES ? 1 : TASK_BYTES / job->chunk_size;
    size_t tasks = (n_chunks + job->chunks_per_task - 1) / job->chunks_per_task;
    if (job->len < PARALLEL_MIN) {
        for (size_t i = 0; i < tasks; i++) chunk_task(job, i, 0);
    } else {
        pool_run(tasks, chunk_task, job);
    }
}

void thaw_chunk_crcs(const void *data, size_t len, size_t chunk_size, uint32_t *out) {
    chunk_job job = {data, len, chunk_size, 0, out, NULL};
    run_chunks(&job);
}

void thaw_copy_chunk_crcs(void *dst, const void *src, size_t len, size_t chunk_size, uint32_t *out) {
    chunk_job job = {src, len, chunk_size, 0, out, dst};
    run_chunks(&job);
}

typedef struct {
    const uint8_t *data;
    size_t len, piece, pieces;
    uint32_t crcs[64];
} split_job;

static void split_task(void *ctx, size_t index, int worker) {
    (void)worker;
    split_job *job = ctx;
    size_t start = index * job->piece;
    size_t n = index + 1 < job->pieces ? job->piece : job->len - start; /* the last takes the rest */
    job->crcs[index] = ~kernel()(~0u, job->data + start, n);
}

uint32_t thaw_crc32c_parallel(uint32_t crc, const void *data, size_t len) {
    size_t pieces = (size_t)thaw_threads();
    if (len < PARALLEL_MIN || pieces == 1) return thaw_crc32c(crc, data, len);
    if (pieces > 64) pieces = 64;
    split_job job = {data, len, (len / pieces) & ~(size_t)4095, pieces, {0}}; /* 4 KiB multiples */
    pool_run(pieces, split_task, &job);
    for (size_t i = 0; i < pieces; i++) {
        size_t n = i + 1 < pieces ? job.piece : len - i * job.piece;
        crc = thaw_crc32c_combine(crc, job.crcs[i], n);
    }
    return crc;
}
