/* Gather scattered slabs into one contiguous run and scatter them back, split across the thread pool.
 * Every offset is checked before the first byte moves. */
#include <string.h>

#include "../include/thaw.h"
#include "pool.h"

enum { TASK_BYTES = 1 << 20, PARALLEL_MIN = 4 << 20 };

typedef struct {
    const uint8_t *src;
    uint8_t *out;
    const int64_t *offsets;
    size_t n, length, per_task;
    int to_contiguous;
} slab_job;

static void slab_task(void *ctx, size_t index, int worker) {
    (void)worker;
    slab_job *j = ctx;
    size_t end = (index + 1) * j->per_task < j->n ? (index + 1) * j->per_task : j->n;
    for (size_t i = index * j->per_task; i < end; i++) {
        if (j->to_contiguous)
            memcpy(j->out + i * j->length, j->src + j->offsets[i], j->length);
        else
            memcpy(j->out + j->offsets[i], j->src + i * j->length, j->length);
    }
}

/* Returns i+1 for the first offset whose slab leaves [0, limit), else 0. */
static int64_t check_offsets(const int64_t *offsets, size_t n, size_t length, size_t limit) {
    for (size_t i = 0; i < n; i++)
        if (offsets[i] < 0 || (uint64_t)offsets[i] > limit || limit - (uint64_t)offsets[i] < length) return (int64_t)i + 1;
    return 0;
}

static void move_slabs(slab_job *j) {
    size_t total = j->n * j->length;
    j->per_task = j->length >= TASK_BYTES ? 1 : TASK_BYTES / (j->length ? j->length : 1);
    size_t tasks = (j->n + j->per_task - 1) / j->per_task;
    if (total < PARALLEL_MIN) {
        for (size_t t = 0; t < tasks; t++) slab_task(j, t, 0);
    } else {
        pool_run(tasks, slab_task, j);
    }
}

int64_t thaw_gather(const void *src, size_t src_len, const int64_t *offsets, size_t n, size_t length, void *out,
                    size_t out_len) {
    if (length && n > out_len / length) return -1;
    int64_t bad = check_offsets(offsets, n, length, src_len);
    if (bad) return bad;
    slab_job j = {src, out, offsets, n, length, 0, 1};
    move_slabs(&j);
    return 0;
}

int64_t thaw_scatter(const void *src, size_t src_len, void *out, size_t out_len, const int64_t *offsets, size_t n,
                     size_t length) {
    if (length && n > src_len / length) return -1;
    int64_t bad = check_offsets(offsets, n, length, out_len);
    if (bad) return bad;
    slab_job j = {src, out, offsets, n, length, 0, 0};
    move_slabs(&j);
    return 0;
}
