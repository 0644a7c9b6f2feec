/* A fixed set of worker threads, started on first use and kept for the life of the process. A job is a
 * parallel for-loop: workers take the next index from a shared counter until none is left, or (pool_run_shares)
 * each from its own contiguous share first. A child made by fork() has no workers, so it forgets the pool and
 * starts its own on first use. */
#define _GNU_SOURCE /* sched_getaffinity */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "../include/thaw.h"
#include "pool.h"

enum { MAX_THREADS = 16 };

typedef struct {
    pthread_mutex_t busy; /* held by the one caller that owns the pool for a job */
    pthread_mutex_t lock; /* guards the fields below */
    pthread_cond_t wake, done;
    unsigned long generation; /* bumped for each job */
    int threads, running;     /* running: workers that joined the current job and are still inside it (0 between) */
    int open;                 /* whether a worker that wakes now may join the current job */
    pool_task task;
    void *ctx;
    size_t n;
    atomic_size_t next;
    int shares;                             /* 0: one shared counter (next); else one share per worker */
    atomic_size_t share_next[MAX_THREADS]; /* share s is [share_next[s], share_end[s]) */
    size_t share_end[MAX_THREADS];
} pool;

static pool *the_pool;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void work(pool *p, int worker) {
    if (!p->shares) {
        for (size_t i; (i = atomic_fetch_add(&p->next, 1)) < p->n;) p->task(p->ctx, i, worker);
        return;
    }
    /* Its own share in order, then whatever is left of the others' (taken from their fronts, as their owners do). */
    for (int k = 0; k < p->shares; k++) {
        int s = (worker + k) % p->shares;
        for (size_t i; (i = atomic_fetch_add(&p->share_next[s], 1)) < p->share_end[s];) p->task(p->ctx, i, worker);
    }
}

typedef struct {
    pool *p;
    int worker;
} worker_arg;

static void *worker_main(void *arg) {
    worker_arg a = *(worker_arg *)arg;
    free(arg);
    pool *p = a.p;
    unsigned long seen = 0;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        while (p->generation == seen) pthread_cond_wait(&p->wake, &p->lock);
        seen = p->generation;
        int join = p->open;
        if (join) p->running++;
        pthread_mutex_unlock(&p->lock);
        /* joined too late: the job is closed (every index taken), and its caller does not wait for it */
        if (!join) continue;
        work(p, a.worker);
        pthread_mutex_lock(&p->lock);
        if (--p->running == 0) pthread_cond_signal(&p->done);
        pthread_mutex_unlock(&p->lock);
    }
    return NULL;
}

static int cpu_count(void) {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static void forget_pool_in_child(void) {
    the_pool = NULL; /* its threads do not exist here; its memory is left alone */
    once = (pthread_once_t)PTHREAD_ONCE_INIT;
}

static void start_pool(void) {
    static int atfork_registered;
    if (!atfork_registered) atfork_registered = pthread_atfork(NULL, NULL, forget_pool_in_child) == 0;
    pool *p = calloc(1, sizeof *p);
    if (!p) return;
    pthread_mutex_init(&p->busy, NULL);
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    int want = cpu_count();
    if (want > MAX_THREADS) want = MAX_THREADS;
    p->threads = 1;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int w = 1; w < want; w++) {
        pthread_t t;
        worker_arg *a = malloc(sizeof *a);
        if (!a) break;
        *a = (worker_arg){p, w};
        if (pthread_create(&t, &attr, worker_main, a) != 0) {
            free(a);
            break;
        }
        p->threads++;
    }
    pthread_attr_destroy(&attr);
    the_pool = p;
}

static pool *get_pool(void) {
    pthread_once(&once, start_pool);
    return the_pool;
}

int thaw_threads(void) {
    pool *p = get_pool();
    return p ? p->threads : 1;
}

/* Run a job on the pool (shares: split [0, n) into one contiguous share per worker), or on the calling thread
 * alone, in index order, when the pool is missing, has one thread or is held by another call. */
static void run_job(size_t n, pool_task task, void *ctx, int shares) {
    pool *p = get_pool();
    if (!p || p->threads == 1 || n <= 1 || pthread_mutex_trylock(&p->busy) != 0) {
        for (size_t i = 0; i < n; i++) task(ctx, i, 0);
        return;
    }
    pthread_mutex_lock(&p->lock);
    p->task = task;
    p->ctx = ctx;
    p->n = n;
    atomic_store(&p->next, 0);
    p->shares = shares ? p->threads : 0;
    for (int s = 0; s < p->shares; s++) {
        atomic_store(&p->share_next[s], n * (size_t)s / (size_t)p->shares);
        p->share_end[s] = n * (size_t)(s + 1) / (size_t)p->shares;
    }
    p->open = 1;
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    work(p, 0);
    /* Every index is taken: wait only for the workers that joined (one may still be in its task), not for those
     * the scheduler has not run yet, which would add their wake-up to every call on a busy machine. */
    pthread_mutex_lock(&p->lock);
    p->open = 0;
    while (p->running) pthread_cond_wait(&p->done, &p->lock);
    pthread_mutex_unlock(&p->lock);
    pthread_mutex_unlock(&p->busy);
}

void pool_run(size_t n, pool_task task, void *ctx) { run_job(n, task, ctx, 0); }

void pool_run_shares(size_t n, pool_task task, void *ctx) { run_job(n, task, ctx, 1); }
