/* The persistent thread pool behind every parallel call. */
#ifndef THAW_POOL_H
#define THAW_POOL_H

#include <stddef.h>

/* One unit of work: index < n, worker < thaw_threads() (the calling thread is worker 0), so tasks can use
 * per-worker scratch space. */
typedef void (*pool_task)(void *ctx, size_t index, int worker);

/* Run task(ctx, i, worker) for every i < n and return when all are done. The caller works too. When another
 * call already holds the pool, this one runs its tasks on the calling thread alone, as worker 0. */
void pool_run(size_t n, pool_task task, void *ctx);

#endif
