/* Region I/O on the thread pool. Reads cut the regions into pieces of a few hundred KiB (whole chunks; small
 * regions are batched), and the workers take pieces in file order, so at any moment one worker reads while
 * another checks or copies: each worker's staging buffer is one slot of the pipeline's ring.
 *
 * Writes cut the file into 2 MiB spans, checksum the chunks that start in a span and pwritev the span straight
 * after, while it is still in cache. Reads pread a piece
 * into the worker's private staging buffer, check every chunk there, and copy it out only when all pass;
 * a failed piece never touches the caller's memory. */
#define _GNU_SOURCE /* O_DIRECT */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "../include/thaw.h"
#include "guard.h"
#include "io_impl.h"
#include "pool.h"

/* WRITE_ALIGN: writes go out in spans of the file that end on 2 MiB offsets, each one pwritev of whatever regions
 * and padding the span holds, so the page cache can keep the file in 2 MiB folios: a later mapping of it then
 * faults in once per 2 MiB instead of once per 64 KiB, which is most of the cost of a mapped load. */
enum { PIECE_BYTES = 256 << 10, WRITE_ALIGN = 2 << 20, DIRECT_ALIGN = 4096, MAX_WORKERS = 64, MAX_IOV = 256 };

/* Reads: whole chunks [start, start + len) of regions[first], or regions [first, first + count) whole.
 * Writes: file bytes [start, start + len), holding parts of regions [first, first + count). */
typedef struct {
    size_t first, count;
    uint64_t start, len;
} piece;

typedef struct {
    const thaw_region *regions;
    piece *pieces;
    size_t n_pieces;
    int fd, direct_fd;
    int flags; /* THAW_ZERO_GAPS for mapped checks */
    size_t stage_bytes;
    uint8_t *stage[MAX_WORKERS];
    atomic_size_t first_failure; /* lowest failed piece index, or n_pieces */
    atomic_int direct_refused;
    pthread_mutex_t lock; /* guards the failure details below */
    int error;            /* errno of the first failed piece, 0 for a bad chunk */
    int64_t bad_region, bad_chunk;
} job;

static uint64_t span_of(const thaw_region *r, const piece *p) {
    if (p->count == 0) return p->len;
    const thaw_region *last = &r[p->first + p->count - 1];
    return last->offset + last->len - r[p->first].offset;
}

/* Reads: cut regions into pieces of whole chunks, and batch small regions where their file ranges follow each
 * other in order with small gaps, so one pread covers the batch. Returns the largest piece span, or 0 on OOM. */
static uint64_t make_pieces(const thaw_region *r, size_t n, piece **out, size_t *n_out) {
    size_t cap = 16, count = 0;
    uint64_t widest = 0;
    piece *ps = malloc(cap * sizeof *ps);
    if (!ps) return 0;
    for (size_t i = 0; i < n;) {
        piece p = {i, 0, 0, 0};
        if (r[i].len >= PIECE_BYTES / 2) {
            uint64_t step = r[i].chunk_size >= PIECE_BYTES ? r[i].chunk_size : PIECE_BYTES / r[i].chunk_size * r[i].chunk_size;
            for (uint64_t start = 0; start < r[i].len; start += step) {
                if (count == cap && !(ps = realloc(ps, (cap *= 2) * sizeof *ps))) return 0;
                p.start = start;
                p.len = r[i].len - start < step ? r[i].len - start : step;
                ps[count++] = p;
                if (p.len > widest) widest = p.len;
            }
            i++;
            continue;
        }
        uint64_t end = r[i].offset + r[i].len, bytes = r[i].len;
        for (p.count = 1; i + p.count < n && p.count < MAX_IOV; p.count++) {
            const thaw_region *next = &r[i + p.count];
            if (next->len >= PIECE_BYTES / 2) break;
            if (next->offset < end || next->offset - end > DIRECT_ALIGN) break;
            uint64_t more = next->offset + next->len - end;
            if (bytes + more > PIECE_BYTES) break;
            bytes += more;
            end = next->offset + next->len;
        }
        if (count == cap && !(ps = realloc(ps, (cap *= 2) * sizeof *ps))) return 0;
        ps[count++] = p;
        if (span_of(r, &p) > widest) widest = span_of(r, &p);
        i += p.count;
    }
    *out = ps;
    *n_out = count;
    return widest ? widest : 1;
}

static void fail(job *j, size_t index, int error, int64_t region, int64_t chunk) {
    /* Keep the failure with the lowest piece index; pieces after it are skipped. */
    pthread_mutex_lock(&j->lock);
    if (index < atomic_load(&j->first_failure)) {
        atomic_store(&j->first_failure, index);
        j->error = error;
        j->bad_region = region;
        j->bad_chunk = chunk;
    }
    pthread_mutex_unlock(&j->lock);
}

static int skip(job *j, size_t index) { return index > atomic_load(&j->first_failure); }

/* ---- writes ---- */

/* Padding between regions that a batched write fills with zeros, so it needs no system call of its own. */
static const uint8_t zeros[DIRECT_ALIGN];

/* pwritev iov[0, n) at offset, going on after a short write until all of it is written (io_impl.h). */
int pwritev_all(int fd, struct iovec *iov, int n, uint64_t offset) {
    while (n > 0) {
        ssize_t w;
        do w = pwritev(fd, iov, n, (off_t)offset);
        while (w < 0 && errno == EINTR);
        if (w <= 0) return w < 0 ? errno : EIO;
        offset += (uint64_t)w;
        for (; n > 0 && (size_t)w >= iov->iov_len; iov++, n--) w -= (ssize_t)iov->iov_len;
        if (n > 0) iov->iov_base = (uint8_t *)iov->iov_base + w, iov->iov_len -= (size_t)w;
    }
    return 0;
}

/* Whether region b can join a batched write right after region a. */
static int follows(const thaw_region *a, const thaw_region *b) {
    uint64_t end = a->offset + a->len;
    return b->offset >= end && b->offset - end < DIRECT_ALIGN;
}

/* Writes: the file's image (runs of regions that follow each other, the gaps between them zeros) cut at
 * WRITE_ALIGN file offsets into spans, so each 2 MiB of the file is written by one pwritev whatever regions
 * and padding it holds. A span covers parts of regions [first, first + count) over [start, start + len).
 * Returns 1, or 0 on OOM. */
static int make_spans(const thaw_region *r, size_t n, piece **out, size_t *n_out) {
    size_t cap = 16, count = 0;
    piece *ps = malloc(cap * sizeof *ps);
    if (!ps) return 0;
    for (size_t i = 0, j; i < n; i = j) {
        for (j = i + 1; j < n && follows(&r[j - 1], &r[j]); j++) {
        }
        uint64_t s = r[i].offset, end = r[j - 1].offset + r[j - 1].len;
        size_t k = i;
        do {
            uint64_t e = s / WRITE_ALIGN * WRITE_ALIGN + WRITE_ALIGN;
            if (e > end) e = end;
            while (k + 1 < j && r[k].offset + r[k].len <= s) k++; /* skip regions that end before the span */
            size_t last = k;
            while (last + 1 < j && r[last + 1].offset < e) last++;
            if (count == cap && !(ps = realloc(ps, (cap *= 2) * sizeof *ps))) return 0;
            ps[count++] = (piece){k, last - k + 1, s, e - s};
            s = e;
        } while (s < end);
    }
    *out = ps;
    *n_out = count;
    return 1;
}

/* One span: the CRCs of the chunks that start in it (they may run on past its end), then one pwritev of its
 * region parts and the zeros between them, written while the bytes are still in cache. */
static void write_task(void *ctx, size_t index, int worker) {
    (void)worker;
    job *j = ctx;
    const piece *p = &j->pieces[index];
    struct iovec iov[2 * MAX_IOV];
    int n_iov = 0, err = 0;
    uint64_t pos = p->start, at = p->start, span_end = p->start + p->len;
    for (size_t k = p->first; k < p->first + p->count && !err; k++) {
        const thaw_region *r = &j->regions[k];
        uint64_t from = r->offset > pos ? r->offset : pos, to = r->offset + r->len < span_end ? r->offset + r->len : span_end;
        if (to <= from) continue;
        uint64_t cs = r->chunk_size, lo = from - r->offset, hi = to - r->offset;
        uint64_t c0 = (lo + cs - 1) / cs, stop = (hi + cs - 1) / cs * cs;
        if (c0 * cs < hi)
            thaw_chunk_crcs((const uint8_t *)r->buf + c0 * cs, (stop < r->len ? stop : r->len) - c0 * cs, cs, r->crcs + c0);
        if (n_iov + 2 > 2 * MAX_IOV) { /* a span of very many tiny regions: write what is gathered so far */
            err = pwritev_all(j->fd, iov, n_iov, at);
            at = pos;
            n_iov = 0;
        }
        if (from > pos) iov[n_iov++] = (struct iovec){(void *)zeros, from - pos}; /* padding, under 4 KiB */
        iov[n_iov++] = (struct iovec){(uint8_t *)r->buf + lo, hi - lo};
        pos = to;
    }
    if (!err && pos < span_end) { /* the span ends on a 2 MiB offset inside padding */
        if (n_iov + 1 > 2 * MAX_IOV) err = pwritev_all(j->fd, iov, n_iov, at), at = pos, n_iov = 0;
        iov[n_iov++] = (struct iovec){(void *)zeros, span_end - pos};
    }
    if (!err && n_iov) err = pwritev_all(j->fd, iov, n_iov, at);
    if (err) fail(j, index, err, (int64_t)p->first, -1);
}

/* ---- reads and verifies ---- */

/* Read [offset, offset + n) of the file into dst, where dst has room for the O_DIRECT rounding; returns a
 * pointer to the first requested byte, or NULL with *err set. */
static const uint8_t *read_span(job *j, uint8_t *dst, uint64_t offset, uint64_t n, int *err) {
    int fd = j->fd;
    uint64_t lead = 0, want = n;
    if (j->direct_fd >= 0 && !atomic_load(&j->direct_refused)) {
        fd = j->direct_fd;
        lead = offset % DIRECT_ALIGN;
        want = (lead + n + DIRECT_ALIGN - 1) / DIRECT_ALIGN * DIRECT_ALIGN;
        offset -= lead;
    }
    uint64_t got = 0;
    while (got < lead + n) {
        ssize_t r = pread(fd, dst + got, want - got, (off_t)(offset + got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EINVAL && fd == j->direct_fd) { /* this filesystem refuses O_DIRECT here */
            atomic_store(&j->direct_refused, 1);
            return read_span(j, dst, offset + lead, n, err);
        }
        if (r < 0) return (*err = errno), NULL;
        if (r == 0) return (*err = THAW_EOF), NULL;
        got += (uint64_t)r;
        if (fd == j->direct_fd && got % DIRECT_ALIGN) break; /* end of file inside the last block */
    }
    if (got < lead + n) return (*err = THAW_EOF), NULL;
    return dst + lead;
}

static uint8_t *stage_of(job *j, int worker) {
    if (!j->stage[worker]) {
        void *mem = NULL;
        if (posix_memalign(&mem, DIRECT_ALIGN, j->stage_bytes) == 0) j->stage[worker] = mem;
    }
    return j->stage[worker];
}

/* Check the chunk CRCs of `len` bytes at data, covering chunks from index `first_chunk` of r; returns the
 * index of the first bad chunk, or -1. */
static int64_t check(const thaw_region *r, const uint8_t *data, uint64_t len, uint64_t first_chunk) {
    for (uint64_t c = 0; c * r->chunk_size < len; c++) {
        uint64_t n = len - c * r->chunk_size < r->chunk_size ? len - c * r->chunk_size : r->chunk_size;
        if (thaw_crc32c(0, data + c * r->chunk_size, n) != r->crcs[first_chunk + c]) return (int64_t)(first_chunk + c);
    }
    return -1;
}

/* Fresh memory, the usual target of a load, costs one page fault per 4 KiB inside memcpy, more than the
 * copy itself (far more in a VM). So large targets are asked to use transparent huge pages, and each piece's
 * target pages are faulted in with one system call before the copy (thaw_prefault, prefault.c). Both are hints:
 * a kernel that refuses them (MADV_POPULATE_WRITE needs 5.14) leaves the copy to fault as usual. The bytes are
 * never changed. */
static void madvise_interior(void *target, uint64_t len, uintptr_t align, int advice) {
    uintptr_t start = ((uintptr_t)target + align - 1) & ~(align - 1), end = ((uintptr_t)target + len) & ~(align - 1);
    if (end > start) madvise((void *)start, end - start, advice);
}

void thaw_start_writeback(int fd, uint64_t offset, uint64_t len) {
#ifdef SYNC_FILE_RANGE_WRITE
    if (len) sync_file_range(fd, (off_t)offset, (off_t)len, SYNC_FILE_RANGE_WRITE);
#else
    (void)fd, (void)offset, (void)len;
#endif
}

static void prefer_huge_pages(const thaw_region *regions, size_t n) {
#ifdef MADV_HUGEPAGE
    for (size_t i = 0; i < n; i++)
        if (regions[i].buf && regions[i].len >= (4u << 20)) madvise_interior(regions[i].buf, regions[i].len, 2u << 20, MADV_HUGEPAGE);
#else
    (void)regions, (void)n;
#endif
}

static void read_task_with(job *j, size_t index, int worker, int copy_out) {
    if (skip(j, index)) return;
    const piece *p = &j->pieces[index];
    const thaw_region *r = &j->regions[p->first];
    uint8_t *stage = stage_of(j, worker);
    if (!stage) return fail(j, index, ENOMEM, (int64_t)p->first, -1);
    int err = 0;
    if (p->count == 0) {
        const uint8_t *data = read_span(j, stage, r->offset + p->start, p->len, &err);
        if (!data) return fail(j, index, err, (int64_t)p->first, -1);
        int64_t bad = check(r, data, p->len, p->start / r->chunk_size);
        if (bad >= 0) return fail(j, index, 0, (int64_t)p->first, bad);
        if (copy_out) {
            thaw_prefault((uint8_t *)r->buf + p->start, p->len); /* a hint: a failure leaves the copy to fault */
            memcpy((uint8_t *)r->buf + p->start, data, p->len);
        }
        return;
    }
    const uint8_t *data = read_span(j, stage, r->offset, span_of(j->regions, p), &err);
    if (!data) return fail(j, index, err, (int64_t)p->first, -1);
    for (size_t k = 0; k < p->count; k++) {
        int64_t bad = check(&r[k], data + (r[k].offset - r->offset), r[k].len, 0);
        if (bad >= 0) return fail(j, index, 0, (int64_t)(p->first + k), bad);
    }
    if (copy_out)
        for (size_t k = 0; k < p->count; k++) memcpy(r[k].buf, data + (r[k].offset - r->offset), r[k].len);
}

/* Whether the gap between region i - 1's end and region i's start (both in memory) is all zero. */
static int gap_is_zero(const thaw_region *regions, size_t i) {
    const uint8_t *p = (const uint8_t *)regions[i - 1].buf + regions[i - 1].len, *end = regions[i].buf;
    uint8_t any = 0;
    for (; p < end; p++) any |= *p; /* vectorised by the compiler; gaps are short */
    return !any;
}

/* A region's bytes already in memory at buf (a mapping of the file, or a buffer holding it): checked where
 * they lie, each piece by the worker that takes it, so the pages are read once, by the CRC. With
 * THAW_ZERO_GAPS the piece holding a region's first byte also checks the gap before it. A SIGBUS while
 * reading (the file shrank under its mapping) fails the piece instead of ending the process. */
static void mapped_task(void *ctx, size_t index, int worker) {
    (void)worker;
    job *j = ctx;
    if (skip(j, index)) return;
    const piece *p = &j->pieces[index];
    const thaw_region *r = &j->regions[p->first];
    int gaps = j->flags & THAW_ZERO_GAPS;
    sigjmp_buf env;
    if (sigsetjmp(env, 0)) return fail(j, index, THAW_FAULT, (int64_t)p->first, -1);
    guard_enter(&env);
    if (p->count == 0) {
        if (gaps && p->start == 0 && p->first > 0 && !gap_is_zero(j->regions, p->first)) {
            guard_leave();
            return fail(j, index, 0, (int64_t)p->first, -1);
        }
        int64_t bad = check(r, (const uint8_t *)r->buf + p->start, p->len, p->start / r->chunk_size);
        guard_leave();
        if (bad >= 0) fail(j, index, 0, (int64_t)p->first, bad);
        return;
    }
    for (size_t k = 0; k < p->count; k++) {
        size_t i = p->first + k;
        int gap_bad = gaps && i > 0 && !gap_is_zero(j->regions, i);
        int64_t bad = gap_bad ? -1 : check(&r[k], r[k].buf, r[k].len, 0);
        if (gap_bad || bad >= 0) {
            guard_leave();
            return fail(j, index, 0, (int64_t)i, bad);
        }
    }
    guard_leave();
}

static void read_task(void *ctx, size_t index, int worker) { read_task_with(ctx, index, worker, 1); }
static void verify_task(void *ctx, size_t index, int worker) { read_task_with(ctx, index, worker, 0); }

/* ---- the three calls ---- */

static int run(int fd, const thaw_region *regions, size_t n, int for_read, int flags, pool_task task,
               thaw_io_status *status) {
    *status = (thaw_io_status){0, -1, -1, 0};
    for (size_t i = 0; i < n; i++)
        if (regions[i].chunk_size == 0) return (status->error = EINVAL), THAW_IO_ERROR;
    job j = {.regions = regions, .fd = fd, .direct_fd = -1, .flags = flags};
    uint64_t widest = for_read ? make_pieces(regions, n, &j.pieces, &j.n_pieces)
                              : (uint64_t)make_spans(regions, n, &j.pieces, &j.n_pieces);
    if (!widest) return (status->error = ENOMEM), THAW_IO_ERROR;
    atomic_init(&j.first_failure, j.n_pieces);
    atomic_init(&j.direct_refused, 0);
    pthread_mutex_init(&j.lock, NULL);
    j.stage_bytes = (widest + 3 * DIRECT_ALIGN - 1) / DIRECT_ALIGN * DIRECT_ALIGN; /* room for rounding */
    if (for_read && (flags & THAW_DIRECT)) {
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        j.direct_fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC); /* -1 where O_DIRECT is refused */
    }
    if (task == read_task) prefer_huge_pages(regions, n);
    if (task == mapped_task)
        pool_run_shares(j.n_pieces, task, &j);
    else
        pool_run(j.n_pieces, task, &j);
    status->direct = j.direct_fd >= 0 && !atomic_load(&j.direct_refused);
    if (j.direct_fd >= 0) close(j.direct_fd);
    for (int w = 0; w < MAX_WORKERS; w++) free(j.stage[w]);
    free(j.pieces);
    pthread_mutex_destroy(&j.lock);
    if (atomic_load(&j.first_failure) == j.n_pieces) return THAW_OK;
    status->error = j.error;
    status->bad_region = j.bad_region;
    status->bad_chunk = j.bad_chunk;
    return j.error ? THAW_IO_ERROR : j.bad_chunk < 0 ? THAW_BAD_GAP : THAW_BAD_CHUNK;
}

int thaw_write_regions(int fd, const thaw_region *regions, size_t n, thaw_io_status *status) {
    return run(fd, regions, n, 0, 0, write_task, status);
}

int thaw_read_regions(int fd, const thaw_region *regions, size_t n, int flags, thaw_io_status *status) {
    return run(fd, regions, n, 1, flags, read_task, status);
}

int thaw_verify_regions(int fd, const thaw_region *regions, size_t n, int flags, thaw_io_status *status) {
    return run(fd, regions, n, 1, flags, verify_task, status);
}

int thaw_check_mapped(const thaw_region *regions, size_t n, int flags, thaw_io_status *status) {
    if (flags & THAW_ZERO_GAPS)
        for (size_t i = 1; i < n; i++)
            if ((const uint8_t *)regions[i].buf < (const uint8_t *)regions[i - 1].buf + regions[i - 1].len) {
                *status = (thaw_io_status){EINVAL, (int64_t)i, -1, 0};
                return THAW_IO_ERROR;
            }
    int err = guard_install();
    if (err) {
        *status = (thaw_io_status){err, -1, -1, 0};
        return THAW_IO_ERROR;
    }
    return run(-1, regions, n, 1, flags & THAW_ZERO_GAPS, mapped_task, status);
}
