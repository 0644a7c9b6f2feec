/* Gather engine KV blocks into token-major pages (with the chunk CRCs of the output, in the same pass) and
 * scatter pages back into blocks, applying the engine's element order on the way.
 *
 * A page is `rows` rows of `row_elems` elements. Row r of page i reads its elements from the source block at
 * byte offset block_offsets[i], starting at element row_start[r] and stepping col_stride elements. That one
 * description covers a plain slab (one row, stride 1), a head-major sequence array seen token-major (a row per
 * token and head), and a transposed K (stride = the block's token count). Every range is checked before the
 * first byte moves; the work is split across the thread pool in output-chunk units, so each chunk's CRC is
 * computed by the thread that moves it: as it moves it where rows allow (move_folded), else while the bytes
 * are still in its cache (move_summed). */
#define _GNU_SOURCE /* process_vm_readv */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "../include/thaw.h"
#include "crc32c_impl.h"
#include "guard.h"
#include "io_impl.h"
#include "pool.h"

/* FILE_SPAN: a gather into a file writes each 2 MiB-aligned span of the file with one pwrite from one thread's
 * tile (io.c's WRITE_ALIGN, for the same reason: the page cache then keeps the file in 2 MiB folios, which a
 * later mapping faults in once each, where writes of 1 MiB off that alignment left folios of 64 KiB and less). */
enum { UNIT_BYTES = 1 << 20, FILE_SPAN = 2 << 20, TILE_BYTES = FILE_SPAN, PARALLEL_MIN = 4 << 20,
       CRC_PIECE_BYTES = 128 << 10 };

typedef struct {
    uint8_t *pages;          /* the contiguous side: gather's output, scatter's input */
    uint8_t *blocks;         /* the engine side */
    const int64_t *offsets;  /* per page: byte offset of its block in `blocks` */
    const thaw_page_layout *layout;
    size_t page_elems, total_elems, unit_elems, chunk_size;
    uint32_t *crcs;          /* gather only: one per chunk_size of output, or NULL */
    int to_pages;
    size_t *order;           /* rows by source address, or NULL (rows already in that order) */
    const uint32_t *expected; /* checked scatter only: one CRC per unit of input, or NULL */
    int64_t bad;             /* checked scatter: the first unit whose CRC failed, or -1 */
    int pid;                 /* remote scatter: the process whose memory holds the pages (at `pages`), or 0 */
    int error;               /* remote scatter or gather into a file: errno of the first read or write that
                              * failed; checked scatter: THAW_FAULT once its pages faulted; else 0 */
    int fd;                  /* gather into a file: its descriptor (pages is NULL), else -1 */
    uint64_t file_offset;    /* gather into a file: where the first page goes */
    size_t lead_elems;       /* the first unit's elements (up to the first FILE_SPAN boundary), or 0: unit_elems */
    uint32_t *parts;         /* gather into a file: per unit, the CRC of its first piece when that continues a
                              * chunk begun in the unit before (combined into crcs after the run) */
    int no_memory;           /* a unit found no tile: the call fails with THAW_PAGES_NO_MEMORY */
    int release;             /* batch: unmap the pages once every unit has moved (release_pages) */
    size_t units_left;       /* batch with release: units not finished yet */
    const struct pages_crc16 *summed16; /* gather with CRCs in 16-row tiles summed as they move, or NULL */
    uint8_t *groups;         /* with summed16: per 16 rows of order, the groups of 16 rows read together (1, 2 or
                              * 4) where a step starts there, else 0 */
} page_job;

/* Copy n elements of one row between the contiguous side and the strided side. */
#if defined(__SSE2__)
#include <emmintrin.h>

/* A row with non-temporal stores: a scatter's into the engine's blocks, a gather's without CRCs into the pages.
 * Neither is read again soon, and a plain store first reads each destination line into the cache (a third more
 * memory traffic). unit_task fences once after its rows. */
static int stream_row(uint8_t *dst, const uint8_t *src, size_t len) {
    if (((uintptr_t)dst & 15) || len < 256) return 0;
    size_t i = 0;
    for (; i + 64 <= len; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i)), b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32)), d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    memcpy(dst + i, src + i, len - i);
    return 1;
}
static void stream_fence(void) { _mm_sfence(); }
#else
static int stream_row(uint8_t *dst, const uint8_t *src, size_t len) { (void)dst, (void)src, (void)len; return 0; }
static void stream_fence(void) {}
#endif

static void move_row(uint8_t *flat, uint8_t *strided, int64_t stride_bytes, size_t n, size_t itemsize, int to_flat,
                     int stream) {
    if (stride_bytes == (int64_t)itemsize) {
        uint8_t *dst = to_flat ? flat : strided, *src = to_flat ? strided : flat;
        if (!stream || !stream_row(dst, src, n * itemsize)) memcpy(dst, src, n * itemsize);
        return;
    }
#define MOVE(T)                                                                        \
    for (size_t j = 0; j < n; j++) {                                                   \
        T *f = (T *)(flat + j * sizeof(T));                                            \
        uint8_t *s = strided + (int64_t)j * stride_bytes;                              \
        if (to_flat) memcpy(f, s, sizeof(T)); else memcpy(s, f, sizeof(T));            \
    }
    switch (itemsize) {
    case 1: MOVE(uint8_t) break;
    case 2: MOVE(uint16_t) break;
    case 4: MOVE(uint32_t) break;
    default: MOVE(uint64_t) break;
    }
#undef MOVE
}

/* A transposed group: G rows whose sources start one element apart (one dimension of G neighbouring tokens,
 * say) form a [W, G] matrix at `strided` (rows stride_bytes apart) against G flat rows of W elements. It moves
 * in G x G register transposes (SSE2, part of every x86-64; for 4-byte items 8 x 8 in AVX2 and 16 x 16 in AVX-512
 * where the CPU has them), so both sides are read and written in runs of 16 bytes or more rather than one
 * element per cache line; a scatter of 16 such rows of 4-byte items writes whole aligned lines with streaming
 * stores (two 8 x 8 tiles per line in AVX2, one 16 x 16 in AVX-512). Elsewhere the rows move one by one. */

/* The tile kernels, worst first: "rows" moves transposed rows element by element (the portable path). */
enum { TILES_ROWS, TILES_SSE2, TILES_AVX2, TILES_AVX512, N_TILES };
static const char *const tile_names[N_TILES] = {"rows", "sse2", "avx2", "avx512"};
static int tiles_best = -1;   /* the best kernel this CPU runs; -1 until asked */
static int tiles_active = -1; /* the kernel in use: the best, unless thaw_pages_select chose another */

static int best_tiles(void) {
    int best = __atomic_load_n(&tiles_best, __ATOMIC_RELAXED);
    if (best >= 0) return best;
    best = TILES_ROWS;
#if defined(__SSE2__) && (defined(__x86_64__) || defined(_M_X64))
    unsigned f = cpu_x86_features();
    best = !(f & CPU_AVX2) ? TILES_SSE2 : (f & CPU_AVX512) ? TILES_AVX512 : TILES_AVX2;
#endif
    __atomic_store_n(&tiles_best, best, __ATOMIC_RELAXED); /* threads racing here store the same value */
    return best;
}

static int active_tiles(void) {
    int active = __atomic_load_n(&tiles_active, __ATOMIC_RELAXED);
    return active >= 0 ? active : best_tiles();
}

const char *thaw_pages_impl(void) { return tile_names[active_tiles()]; }

const char *thaw_pages_available(void) {
    static const char *const lists[N_TILES] = {"rows", "sse2,rows", "avx2,sse2,rows", "avx512,avx2,sse2,rows"};
    return lists[best_tiles()];
}

int thaw_pages_select(const char *name) {
    for (int k = 0; k <= best_tiles(); k++)
        if (strcmp(tile_names[k], name) == 0) {
            __atomic_store_n(&tiles_active, k, __ATOMIC_RELAXED);
            return 0;
        }
    return -1;
}

#if defined(__SSE2__)
#include <emmintrin.h>

#if defined(__x86_64__) || defined(_M_X64)
#include "pages_impl.h"
#endif

/* The tile sizes to try for an item size and direction, largest first (0 ends the list): 16 rows of 4-byte
 * items fill whole lines of a scatter's blocks (pages_stream16_avx2, pages_stream16_avx512) and are whole lines
 * of a gather's (pages_gather16_avx512). */
static const size_t *group_sizes(size_t itemsize, int to_flat) {
    static const size_t lines4[] = {16, 8, 4, 0}, wide4[] = {8, 4, 0}, sse4[] = {4, 0}, sse2[] = {8, 0}, none[] = {0};
    int tiles = active_tiles();
    if (tiles == TILES_ROWS) return none;
    if (itemsize == 4) return tiles == TILES_SSE2 ? sse4 : tiles == TILES_AVX2 && to_flat ? wide4 : lines4;
    return itemsize == 2 ? sse2 : none;
}

static void transpose4(__m128i *r) {
    __m128i a = _mm_unpacklo_epi32(r[0], r[1]), b = _mm_unpackhi_epi32(r[0], r[1]);
    __m128i c = _mm_unpacklo_epi32(r[2], r[3]), d = _mm_unpackhi_epi32(r[2], r[3]);
    r[0] = _mm_unpacklo_epi64(a, c), r[1] = _mm_unpackhi_epi64(a, c);
    r[2] = _mm_unpacklo_epi64(b, d), r[3] = _mm_unpackhi_epi64(b, d);
}

static void transpose8(__m128i *r) {
    __m128i a[8], b[8];
    for (int i = 0; i < 4; i++) {
        a[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++)
        for (int k = 0; k < 2; k++) {
            b[4 * i + 2 * k] = _mm_unpacklo_epi32(a[4 * i + k], a[4 * i + 2 + k]);
            b[4 * i + 2 * k + 1] = _mm_unpackhi_epi32(a[4 * i + k], a[4 * i + 2 + k]);
        }
    for (int k = 0; k < 4; k++) {
        r[2 * k] = _mm_unpacklo_epi64(b[k], b[4 + k]);
        r[2 * k + 1] = _mm_unpackhi_epi64(b[k], b[4 + k]);
    }
}

/* One tile width: G rows of isz-byte elements, G and isz constants where inlined, so the G loads, the
 * transpose and the G stores stay in registers (a run-time G left them on the stack, measured at half the
 * speed of plain row copies). Returns the columns moved (a multiple of G). */
static inline __attribute__((always_inline)) size_t tiles(uint8_t *const *flat, uint8_t *strided,
                                                          int64_t stride_bytes, size_t w, size_t isz, size_t g,
                                                          int to_flat) {
    uint8_t *f[8];
    for (size_t i = 0; i < g; i++) f[i] = flat[i];
    size_t c = 0;
    __m128i r[8];
    for (; c + g <= w; c += g) {
        uint8_t *s = strided + (int64_t)c * stride_bytes;
        for (size_t i = 0; i < g; i++)
            r[i] = _mm_loadu_si128((const __m128i *)(to_flat ? s + (int64_t)i * stride_bytes : f[i] + c * isz));
        if (g == 4) transpose4(r); else transpose8(r);
        for (size_t i = 0; i < g; i++)
            _mm_storeu_si128((__m128i *)(to_flat ? f[i] + c * isz : s + (int64_t)i * stride_bytes), r[i]);
    }
    return c;
}

static void move_tiles(uint8_t *const *flat, uint8_t *strided, int64_t stride_bytes, size_t w, size_t isz,
                       size_t g, int to_flat) {
    size_t c;
#if defined(__x86_64__) || defined(_M_X64)
    if (isz == 4 && g == 16 && to_flat)
        c = pages_gather16_avx512(flat, strided, stride_bytes, w);
    else if (isz == 4 && g == 16) { /* a scatter's whole lines; unaligned ones go as two tiles of 8 */
        if (((uintptr_t)strided | (uint64_t)stride_bytes) & 63) {
            move_tiles(flat, strided, stride_bytes, w, isz, 8, to_flat);
            move_tiles(flat + 8, strided + 8 * isz, stride_bytes, w, isz, 8, to_flat);
            return;
        }
        c = active_tiles() == TILES_AVX512 ? pages_stream16_avx512(flat, strided, stride_bytes, w)
                                           : pages_stream16_avx2(flat, strided, stride_bytes, w);
    } else if (isz == 4 && g == 8)
        c = pages_tiles8_avx2(flat, strided, stride_bytes, w, to_flat);
    else
#endif
    if (g == 4)
        c = to_flat ? tiles(flat, strided, stride_bytes, w, 4, 4, 1) : tiles(flat, strided, stride_bytes, w, 4, 4, 0);
    else
        c = to_flat ? tiles(flat, strided, stride_bytes, w, 2, 8, 1) : tiles(flat, strided, stride_bytes, w, 2, 8, 0);
    for (; c < w; c++)
        for (size_t i = 0; i < g; i++) {
            uint8_t *s = strided + (int64_t)c * stride_bytes + i * isz, *f = flat[i] + c * isz;
            if (to_flat) memcpy(f, s, isz); else memcpy(s, f, isz);
        }
}
#else
static const size_t *group_sizes(size_t itemsize, int to_flat) {
    static const size_t none[] = {0};
    (void)itemsize, (void)to_flat;
    return none;
}
static void move_tiles(uint8_t *const *flat, uint8_t *strided, int64_t stride_bytes, size_t w, size_t isz,
                       size_t g, int to_flat) {
    (void)flat, (void)strided, (void)stride_bytes, (void)w, (void)isz, (void)g, (void)to_flat;
}
#endif

/* Move a group of rows as one transposed block if the layout allows it from order[k] on (the largest tile that
 * fits); its size, or 0. */
static size_t move_group(page_job *j, uint8_t *block, size_t e, size_t k) {
    const thaw_page_layout *l = j->layout;
    size_t isz = l->itemsize, w = l->row_elems;
    int64_t first = l->row_start[j->order[k]];
    for (const size_t *size = group_sizes(isz, j->to_pages); *size; size++) {
        size_t g = *size, run = 1;
        if (k + g > l->rows) continue;
        while (run < g && l->row_start[j->order[k + run]] == first + (int64_t)run) run++;
        if (run < g) continue;
        uint8_t *flat[16];
        for (size_t i = 0; i < g; i++) flat[i] = j->pages + (e + j->order[k + i] * w) * isz;
        move_tiles(flat, block + first * (int64_t)isz, l->col_stride * (int64_t)isz, w, isz, g, j->to_pages);
        return g;
    }
    return 0;
}

/* Elements [e, end) of the contiguous side, which may start and end inside rows and pages. Whole pages of
 * strided rows move in the order of their source addresses (`order`), in transposed groups where rows allow;
 * partial pages and plain rows go in page order. */
static void move_range(page_job *j, size_t e, size_t end) {
    const thaw_page_layout *l = j->layout;
    size_t w = l->row_elems, isz = l->itemsize;
    int64_t stride = l->col_stride * (int64_t)isz;
    /* A gather's rows stay in cache where they are likely read next: a gather with CRCs sums them, and a small
     * one's caller (under PARALLEL_MIN, as a short page written to a file) may read them at once. */
    int stream = !j->to_pages || (!j->crcs && j->total_elems * isz >= PARALLEL_MIN);
    while (e < end) {
        size_t page = e / j->page_elems, in_page = e % j->page_elems;
        uint8_t *block = j->blocks + j->offsets[page];
        if (in_page == 0 && end - e >= j->page_elems && j->order) {
            for (size_t k = 0; k < l->rows;) {
                size_t moved = move_group(j, block, e, k);
                if (moved) {
                    k += moved;
                    continue;
                }
                size_t row = j->order[k++];
                move_row(j->pages + (e + row * w) * isz, block + l->row_start[row] * (int64_t)isz, stride, w, isz,
                         j->to_pages, stream);
            }
            e += j->page_elems;
            continue;
        }
        size_t row = in_page / w, col = in_page % w;
        size_t n = w - col < end - e ? w - col : end - e;
        uint8_t *strided = block + (l->row_start[row] + (int64_t)col * l->col_stride) * (int64_t)isz;
        move_row(j->pages + e * isz, strided, stride, n, isz, j->to_pages, stream);
        e += n;
    }
}

/* Keep the lowest failed unit (units finish in any order across threads). */
static void record_bad(page_job *j, size_t index) {
    int64_t seen = __atomic_load_n(&j->bad, __ATOMIC_RELAXED);
    while ((seen < 0 || (int64_t)index < seen) &&
           !__atomic_compare_exchange_n(&j->bad, &seen, (int64_t)index, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

static void remote_unit(page_job *j, size_t start, size_t end);
static void checked_unit(page_job *j, size_t start, size_t end);
static void file_unit(page_job *j, size_t index, size_t start, size_t end);
static uint8_t *thread_tile(void);

/* Move elements [e, end) and continue crc over their bytes on the contiguous side, about CRC_PIECE_BYTES at a
 * time: each piece is still in the core's L2 when its CRC reads it (a whole 1 MiB chunk, with the blocks read
 * beside it, is not). Pieces end on page boundaries, so whole pages keep their transposed tiles. */
static uint32_t move_summed(page_job *j, size_t e, size_t end, uint32_t crc) {
    size_t isz = j->layout->itemsize, page = j->page_elems;
    size_t per_piece = CRC_PIECE_BYTES / isz / page ? CRC_PIECE_BYTES / isz / page : 1; /* pages */
    for (size_t stop; e < end; e = stop) {
        stop = (e / page + per_piece) * page;
        if (stop > end) stop = end;
        move_range(j, e, stop);
        crc = thaw_crc32c(crc, j->pages + e * isz, (stop - e) * isz);
    }
    return crc;
}

/* Whether a checked scatter or a gather with CRCs moves each chunk and sums it in one read (move_folded): the
 * CRC kernel has a folding copy (crc32c_fold_rows), rows are plain runs of whole 128-byte steps on both sides,
 * and every chunk starts on a row. */
static crc32c_fold_rows_fn folding(const page_job *j) {
    const thaw_page_layout *l = j->layout;
    size_t row_bytes = l->row_elems * l->itemsize;
    if (l->col_stride != 1 || row_bytes % 128 || j->chunk_size % row_bytes) return NULL;
    return crc32c_fold_rows();
}

enum { FOLD_ROWS = 256 }; /* rows looked up per call of the folding copy */

/* Move elements [e, end) (whole rows) between the pages and the blocks, either way, and return the CRC32C of
 * their bytes (the pages' bytes, in page order), each byte read once: loaded, stored and folded into the CRC by
 * the same instructions. A checked scatter that checked each chunk and then moved it read the pages twice and
 * cost a third more CPU (256 MiB of 512-byte rows, Zen 3); the price is that a chunk is written before its CRC
 * is known, which the checked scatter's contract allows (its blocks are fresh buffers, discarded when any
 * chunk is bad). A gather that moved each piece and then summed it from the cache reached 0.42 of a memory copy
 * on one thread (256 MiB of 4 KiB rows in order, Zen 3), where this reaches 0.92. */
static uint32_t move_folded(page_job *j, crc32c_fold_rows_fn fold_rows, size_t e, size_t end) {
    const thaw_page_layout *l = j->layout;
    size_t w = l->row_elems, isz = l->itemsize;
    /* The blocks' rows are walked row by row, page by page: two divisions per row cost more CPU than the CRC
     * (about 5 ms per 256 MiB of 512-byte rows, Zen 3), as they do not overlap the memory traffic. */
    size_t page = e / j->page_elems, row = e % j->page_elems / w;
    const uint8_t *from[FOLD_ROWS];
    uint8_t *to[FOLD_ROWS];
    crc32c_fold f;
    crc32c_fold_start(&f, ~0u);
    while (e < end) {
        size_t n = 0;
        for (; n < FOLD_ROWS && e < end; n++, e += w) {
            uint8_t *flat = j->pages + e * isz;
            uint8_t *block = j->blocks + j->offsets[page] + l->row_start[row] * (int64_t)isz;
            from[n] = j->to_pages ? block : flat;
            to[n] = j->to_pages ? flat : block;
            if (++row == l->rows) row = 0, page++;
        }
        /* the next call's first row, for the last row of this one to prefetch (it went unfetched: 1 in 256) */
        const uint8_t *after = NULL;
        if (e < end)
            after = j->to_pages ? j->blocks + j->offsets[page] + l->row_start[row] * (int64_t)isz : j->pages + e * isz;
        fold_rows(&f, from, to, n, w * isz, after);
    }
    return ~crc32c_fold_end(&f);
}

/* ---- a gather with CRCs of 16-row transposed tiles, summed as they move (AVX-512) ---------------------------
 * A transposed K otherwise moves a piece with plain stores and sums it from the cache: each page line is then
 * read into the cache before it is written, and the tiles' 16 rows, a page row (4 KiB) apart, share one set of
 * the L1 cache. Summed in the registers, the lines go to memory with streaming stores. For whole pages of 4-byte
 * rows of whole 64-byte lines, every row in a group of 16 neighbours, in units of whole pages. */

#if defined(__x86_64__) || defined(_M_X64)
/* Whether rows order[k .. k + n) exist and start one element after another. */
static int rows_follow(const page_job *j, size_t k, size_t n) {
    const thaw_page_layout *l = j->layout;
    if (k + n > l->rows) return 0;
    for (size_t i = 1; i < n; i++)
        if (l->row_start[j->order[k + i]] != l->row_start[j->order[k]] + (int64_t)i) return 0;
    return 1;
}

static int summed16_fits(const page_job *j) {
    const thaw_page_layout *l = j->layout;
    if (!j->crcs || j->fd >= 0 || !j->to_pages || !j->order || l->itemsize != 4 || (l->row_elems * 4) % 64 ||
        l->rows % 16 || j->unit_elems % j->page_elems || active_tiles() != TILES_AVX512 || !crc32c_folds_512())
        return 0;
    for (size_t k = 0; k < l->rows; k += 16)
        if (!rows_follow(j, k, 16)) return 0;
    return 1;
}

/* Set j->summed16 and j->groups where the job fits; -1 out of memory. Every page has the same rows, so each step
 * takes the most groups of 16 rows whose sources follow on (a block's 64 or 32 tokens), else 1, planned once. */
static int summed16_start(page_job *j) {
    const thaw_page_layout *l = j->layout;
    j->summed16 = NULL;
    j->groups = NULL;
    if (!summed16_fits(j)) return 0;
    j->summed16 = pages_crc16_for(l->rows, l->row_elems * 4);
    j->groups = calloc(l->rows / 16, 1);
    if (!j->summed16 || !j->groups) {
        free(j->groups);
        return -1;
    }
    for (size_t k = 0, g = 4; k < l->rows; k += 16 * g, g = 4) {
        while (g > 1 && !rows_follow(j, k, 16 * g)) g /= 2;
        j->groups[k / 16] = (uint8_t)g;
    }
    return 0;
}

/* Move whole pages [e, end) and return the CRC32C of their bytes. */
static uint32_t move_summed16(page_job *j, size_t e, size_t end) {
    const thaw_page_layout *l = j->layout;
    size_t w = l->row_elems, len = (end - e) * 4;
    _Alignas(16) uint8_t unit[16] = {0}, page[16];
    for (; e < end; e += j->page_elems) {
        uint8_t *block = j->blocks + j->offsets[e / j->page_elems];
        memset(page, 0, sizeof page);
        for (size_t k = 0, g; k < l->rows; k += 16 * g) {
            int64_t first = l->row_start[j->order[k]];
            g = j->groups[k / 16];
            uint8_t *flat[64];
            size_t after[64];
            for (size_t i = 0; i < 16 * g; i++) {
                size_t row = j->order[k + i];
                flat[i] = j->pages + (e + row * w) * 4;
                after[i] = l->rows - 1 - row;
            }
            pages_gather16_crc_avx512(flat, block + first * 4, l->col_stride * 4, j->summed16, after, page, (int)g);
        }
        pages_crc16_next_page(j->summed16, unit, page);
    }
    return pages_crc16_end(unit, len);
}
#else
static int summed16_start(page_job *j) { j->summed16 = NULL, j->groups = NULL; return 0; }
static uint32_t move_summed16(page_job *j, size_t e, size_t end) { (void)j, (void)e, (void)end; return 0; }
#endif

/* The latest run's summing-tile steps per page, by the groups of 16 rows each read together (1, 2 or 4): set once
 * per call, read by tests (thaw_pages_summed_groups) to see which path a gather took. */
static size_t summed_groups[3];

static void note_groups(const page_job *j) {
    size_t n[3] = {0, 0, 0};
    for (size_t s = 0; j->groups && s < j->layout->rows / 16; s++)
        if (j->groups[s]) n[j->groups[s] / 2]++; /* 1, 2, 4 -> 0, 1, 2 */
    for (int i = 0; i < 3; i++) __atomic_store_n(&summed_groups[i], n[i], __ATOMIC_RELAXED);
}

void thaw_pages_summed_groups(size_t counts[3]) {
    for (int i = 0; i < 3; i++) counts[i] = __atomic_load_n(&summed_groups[i], __ATOMIC_RELAXED);
}

/* Unit i covers elements [start, end): the first lead_elems of them, then unit_elems each. */
static size_t unit_start(const page_job *j, size_t index) {
    return index ? j->lead_elems + (index - 1) * j->unit_elems : 0;
}

static size_t unit_end(const page_job *j, size_t index) {
    size_t end = index ? unit_start(j, index) + j->unit_elems : j->lead_elems;
    return end < j->total_elems ? end : j->total_elems;
}

static size_t unit_count(page_job *j) {
    if (!j->lead_elems) j->lead_elems = j->unit_elems;
    if (!j->total_elems) return 0;
    if (j->total_elems <= j->lead_elems) return 1;
    return 1 + (j->total_elems - j->lead_elems + j->unit_elems - 1) / j->unit_elems;
}

/* Whether the chunks of elements [start, end) (whole chunks of the pages), whose bytes are at data, have their
 * expected CRCs; the first that does not is recorded. Units past a chunk already found bad are not checked
 * (the call fails anyway: spare the bandwidth) and do not pass. */
static int chunks_pass(page_job *j, const uint8_t *data, size_t start, size_t end) {
    size_t isz = j->layout->itemsize, cs = j->chunk_size, len = (end - start) * isz, first = start * isz / cs;
    int64_t bad = __atomic_load_n(&j->bad, __ATOMIC_RELAXED);
    if (bad >= 0 && (int64_t)first > bad) return 0;
    for (size_t at = 0; at < len; at += cs) {
        size_t n = len - at < cs ? len - at : cs;
        if (thaw_crc32c(0, data + at, n) != j->expected[first + at / cs]) {
            record_bad(j, first + at / cs);
            return 0;
        }
    }
    return 1;
}

static void unit_task(void *ctx, size_t index, int worker) {
    (void)worker;
    page_job *j = ctx;
    size_t start = unit_start(j, index), end = unit_end(j, index);
    if (j->pid) {
        remote_unit(j, start, end);
        return;
    }
    if (j->fd >= 0) {
        file_unit(j, index, start, end);
        return;
    }
    if (j->expected) {
        checked_unit(j, start, end);
        return;
    }
    if (!j->crcs) {
        move_range(j, start, end);
        stream_fence(); /* the rows streamed are visible once the call returns */
        return;
    }
    /* One unit is one chunk, summed by the thread writing it. */
    if (j->summed16) {
        j->crcs[index] = move_summed16(j, start, end);
        stream_fence(); /* the rows streamed into the pages are visible once the call returns */
        return;
    }
    crc32c_fold_rows_fn fold_rows = folding(j);
    if (!fold_rows) {
        j->crcs[index] = move_summed(j, start, end, 0);
        return;
    }
    j->crcs[index] = move_folded(j, fold_rows, start, end);
    stream_fence(); /* the rows streamed into the pages are visible once the call returns */
}

/* Keep the first errno of a failed unit (the call fails with it). */
static void record_error(page_job *j, int error) {
    int none = 0;
    __atomic_compare_exchange_n(&j->error, &none, error, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

/* A unit of a checked scatter (one chunk): moved and summed in one read where move_folded can, else checked,
 * then moved while it is in cache (a bad chunk then not written). Its pages may be a file's
 * mapping (thaw_mlx.load scatters from one): a SIGBUS while reading them (the file was truncated under the
 * mapping) fails the call with THAW_PAGES_FAULT instead of ending the process. Each thread guards its own
 * units; the blocks are then part written, as after a bad chunk. */
static void checked_unit(page_job *j, size_t start, size_t end) {
    if (__atomic_load_n(&j->error, __ATOMIC_RELAXED)) return; /* the call fails anyway */
    sigjmp_buf env;
    if (sigsetjmp(env, 0)) {
        stream_fence(); /* the rows streamed before the fault, ordered as on success */
        record_error(j, THAW_FAULT);
        return;
    }
    guard_enter(&env);
    crc32c_fold_rows_fn fold_rows = folding(j);
    int64_t bad = __atomic_load_n(&j->bad, __ATOMIC_RELAXED);
    if (fold_rows && !(bad >= 0 && (int64_t)(start * j->layout->itemsize / j->chunk_size) > bad)) {
        size_t chunk = j->chunk_size / j->layout->itemsize;
        for (size_t e = start, stop; e < end; e = stop) {
            stop = (e / chunk + 1) * chunk < end ? (e / chunk + 1) * chunk : end;
            if (move_folded(j, fold_rows, e, stop) != j->expected[e / chunk]) record_bad(j, e / chunk);
        }
        stream_fence();
    } else if (!fold_rows && chunks_pass(j, j->pages + start * j->layout->itemsize, start, end)) {
        move_range(j, start, end);
        stream_fence(); /* the rows streamed into the blocks are visible once the call returns */
    }
    guard_leave();
}

/* The calling thread's tile, or NULL with the job marked to fail with THAW_PAGES_NO_MEMORY. */
static uint8_t *job_tile(page_job *j) {
    uint8_t *tile = thread_tile();
    if (!tile) __atomic_store_n(&j->no_memory, 1, __ATOMIC_RELAXED);
    return tile;
}

/* A unit of a gather into a file (one FILE_SPAN of the file, or the part of it the pages cover), through the
 * thread's tile: moved and summed chunk piece by chunk piece, then written with one pwrite from the tile while
 * it is still in cache, so the engine's memory is read once. A chunk that starts here gets its CRC (whole, or
 * of its head when it runs on into the next unit) in crcs; the piece of a chunk begun in an earlier unit gets
 * its CRC in parts[index], combined in file order after the run (combine_parts). While one thread is in pwrite
 * (the filesystem serialises writes to a file), the others fill their tiles. */
static void file_unit(page_job *j, size_t index, size_t start, size_t end) {
    size_t isz = j->layout->itemsize, chunk = j->chunk_size / isz;
    if (__atomic_load_n(&j->error, __ATOMIC_RELAXED)) return; /* the call fails anyway */
    uint8_t *tile = job_tile(j);
    if (!tile) return;
    page_job local = *j;
    local.pages = (uint8_t *)((uintptr_t)tile - start * isz); /* element start is tile[0] */
    for (size_t e = start, stop; e < end; e = stop) {
        stop = (e / chunk + 1) * chunk < end ? (e / chunk + 1) * chunk : end;
        uint32_t crc = move_summed(&local, e, stop, 0);
        if (e == start && e % chunk)
            j->parts[index] = crc;
        else
            j->crcs[e / chunk] = crc;
    }
    struct iovec piece = {tile, (end - start) * isz};
    int error = pwritev_all(j->fd, &piece, 1, j->file_offset + start * isz);
    if (error) record_error(j, error);
}

/* Complete the CRC of each chunk that runs across units with the parts of it the later units summed. */
static void combine_parts(page_job *j, size_t units) {
    size_t isz = j->layout->itemsize, chunk = j->chunk_size / isz;
    for (size_t u = 1; u < units; u++) {
        size_t start = unit_start(j, u), c = start / chunk;
        if (start % chunk == 0) continue;
        size_t stop = (c + 1) * chunk < unit_end(j, u) ? (c + 1) * chunk : unit_end(j, u);
        j->crcs[c] = thaw_crc32c_combine(j->crcs[c], j->parts[u], (stop - start) * isz);
    }
}

/* The lowest and highest source element (relative to a block's start) the layout touches; -1 if malformed. */
static int layout_span(const thaw_page_layout *l, __int128 *lo, __int128 *hi) {
    if (!l || !l->row_start || !l->rows || !l->row_elems) return -1;
    if (l->itemsize != 1 && l->itemsize != 2 && l->itemsize != 4 && l->itemsize != 8) return -1;
    if (l->rows > ((size_t)1 << 40) || l->row_elems > ((size_t)1 << 40)) return -1;
    __int128 reach = (__int128)l->col_stride * (__int128)(l->row_elems - 1);
    __int128 low = 0, high = 0;
    for (size_t r = 0; r < l->rows; r++) {
        __int128 a = l->row_start[r], b = a + reach;
        __int128 rlo = a < b ? a : b, rhi = a < b ? b : a;
        if (r == 0 || rlo < low) low = rlo;
        if (r == 0 || rhi > high) high = rhi;
    }
    *lo = low;
    *hi = high;
    return 0;
}

static int overlaps(const void *a, size_t a_len, const void *b, size_t b_len) {
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return a_len && b_len && x < y + b_len && y < x + a_len;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Checks shared by both directions; fills the job's sizes. Returns 0 or a THAW_PAGES_* / page index + 1. */
static int64_t prepare(page_job *j, size_t blocks_len, size_t pages_len, size_t n) {
    __int128 lo, hi;
    const thaw_page_layout *l = j->layout;
    if (layout_span(l, &lo, &hi)) return THAW_PAGES_BAD_LAYOUT;
    __int128 page_elems = (__int128)l->rows * l->row_elems;
    if ((__int128)n * page_elems * l->itemsize > (__int128)pages_len) return THAW_PAGES_SHORT_BUFFER;
    j->page_elems = (size_t)page_elems;
    j->total_elems = n * j->page_elems;
    if (j->pages && !j->pid && overlaps(j->pages, j->total_elems * l->itemsize, j->blocks, blocks_len))
        return THAW_PAGES_OVERLAP; /* (a file's pages have no address; a remote scatter's are another process's) */
    for (size_t i = 0; i < n; i++) {
        __int128 first = (__int128)j->offsets[i] + lo * (__int128)l->itemsize;
        __int128 last = (__int128)j->offsets[i] + (hi + 1) * (__int128)l->itemsize;
        if (first < 0 || last > (__int128)blocks_len) return (int64_t)i + 1;
    }
    return 0;
}

typedef struct {
    int64_t start;
    size_t row;
} keyed_row;

static int cmp_rows(const void *a, const void *b) {
    int64_t x = ((const keyed_row *)a)->start, y = ((const keyed_row *)b)->start;
    return (x > y) - (x < y);
}

/* Rows in source-address order, for strided rows (plain rows are contiguous in either order). Returns -1
 * when out of memory. */
static int row_order(page_job *j) {
    const thaw_page_layout *l = j->layout;
    j->order = NULL;
    if (l->col_stride == 1 || l->rows < 2) return 0;
    keyed_row *keyed = malloc(l->rows * sizeof *keyed);
    size_t *order = malloc(l->rows * sizeof *order);
    if (!keyed || !order) {
        free(keyed);
        free(order);
        return -1;
    }
    for (size_t r = 0; r < l->rows; r++) keyed[r] = (keyed_row){l->row_start[r], r};
    qsort(keyed, l->rows, sizeof *keyed, cmp_rows);
    for (size_t r = 0; r < l->rows; r++) order[r] = keyed[r].row;
    free(keyed);
    j->order = order;
    return 0;
}

static int64_t run(page_job *j) {
    if (row_order(j)) return THAW_PAGES_NO_MEMORY;
    if (summed16_start(j)) {
        free(j->order);
        return THAW_PAGES_NO_MEMORY;
    }
    note_groups(j);
    size_t units = unit_count(j);
    if (j->total_elems * j->layout->itemsize < PARALLEL_MIN) {
        for (size_t u = 0; u < units; u++) unit_task(j, u, 0);
    } else {
        pool_run(units, unit_task, j);
    }
    free(j->order);
    free(j->groups);
    return j->no_memory ? THAW_PAGES_NO_MEMORY : 0;
}

int64_t thaw_gather_pages(const void *blocks, size_t blocks_len, const int64_t *block_offsets, size_t n,
                          const thaw_page_layout *layout, void *out, size_t out_len, size_t chunk_size,
                          uint32_t *crcs) {
    page_job j = {out, (uint8_t *)blocks, block_offsets, layout, 0, 0, 0, chunk_size, crcs, 1, NULL, NULL, -1, 0, 0, -1};
    int64_t bad = prepare(&j, blocks_len, out_len, n);
    if (bad) return bad;
    size_t isz = layout->itemsize;
    if (crcs && (chunk_size == 0 || chunk_size % isz)) return THAW_PAGES_BAD_CHUNK;
    j.unit_elems = (crcs ? chunk_size : UNIT_BYTES) / isz;
    return run(&j);
}

int64_t thaw_gather_pages_to_file(int fd, uint64_t offset, const void *blocks, size_t blocks_len,
                                  const int64_t *block_offsets, size_t n, const thaw_page_layout *layout,
                                  size_t chunk_size, uint32_t *crcs, int *error) {
    page_job j = {NULL, (uint8_t *)blocks, block_offsets, layout, 0, 0, 0, chunk_size, crcs, 1, NULL, NULL, -1, 0, 0,
                  fd, offset};
    *error = 0;
    int64_t bad = prepare(&j, blocks_len, (size_t)-1, n);
    if (bad) return bad;
    size_t isz = layout->itemsize;
    if (!crcs || chunk_size == 0 || chunk_size % isz) return THAW_PAGES_BAD_CHUNK;
    if (fd < 0) return *error = EBADF, THAW_PAGES_WRITE;
    j.unit_elems = FILE_SPAN / isz;
    j.lead_elems = (FILE_SPAN - offset % FILE_SPAN) % FILE_SPAN / isz; /* to the first span boundary (0: none) */
    size_t units = unit_count(&j);
    j.parts = malloc((units ? units : 1) * sizeof *j.parts);
    if (!j.parts) return THAW_PAGES_NO_MEMORY;
    bad = run(&j);
    if (!bad && !j.error) combine_parts(&j, units);
    free(j.parts);
    *error = j.error;
    return bad ? bad : j.error ? THAW_PAGES_WRITE : 0;
}

/* A scatter's checks before any byte moves (its ranges, its unit size, no block named twice), which fill the
 * job's sizes; 0 or a THAW_PAGES_* / page index + 1. */
static int64_t scatter_ready(page_job *j, size_t pages_len, size_t blocks_len, size_t n, size_t unit_bytes) {
    int64_t bad = prepare(j, blocks_len, pages_len, n);
    if (bad) return bad;
    if (unit_bytes == 0 || unit_bytes % j->layout->itemsize) return THAW_PAGES_BAD_CHUNK;
    /* Two pages into one block would race between threads: refuse repeated block offsets. */
    int64_t *sorted = NULL;
    if (n > 1) {
        sorted = malloc(n * sizeof *sorted);
        if (!sorted) return THAW_PAGES_NO_MEMORY;
        memcpy(sorted, j->offsets, n * sizeof *sorted);
        qsort(sorted, n, sizeof *sorted, cmp_i64);
        for (size_t i = 1; i < n; i++)
            if (sorted[i] == sorted[i - 1]) {
                free(sorted);
                return THAW_PAGES_REPEATED;
            }
        free(sorted);
    }
    j->unit_elems = unit_bytes / j->layout->itemsize;
    return 0;
}

static int64_t scatter(page_job *j, size_t pages_len, size_t blocks_len, size_t n, size_t unit_bytes) {
    int64_t bad = scatter_ready(j, pages_len, blocks_len, n, unit_bytes);
    return bad ? bad : run(j);
}

int64_t thaw_scatter_pages(const void *pages, size_t pages_len, void *blocks, size_t blocks_len,
                           const int64_t *block_offsets, size_t n, const thaw_page_layout *layout) {
    page_job j = {(uint8_t *)pages, blocks, block_offsets, layout, 0, 0, 0, 0, NULL, 0, NULL, NULL, -1, 0, 0, -1};
    return scatter(&j, pages_len, blocks_len, n, UNIT_BYTES);
}

int64_t thaw_scatter_pages_checked(const void *pages, size_t pages_len, void *blocks, size_t blocks_len,
                                   const int64_t *block_offsets, size_t n, const thaw_page_layout *layout,
                                   size_t chunk_size, const uint32_t *expected, int64_t *bad_chunk) {
    page_job j = {(uint8_t *)pages, blocks, block_offsets, layout, 0, 0, 0, chunk_size, NULL, 0, NULL, expected, -1, 0, 0, -1};
    *bad_chunk = -1;
    if (!expected) return THAW_PAGES_BAD_CHUNK;
    if (guard_install()) return THAW_PAGES_FAULT; /* no guard: refuse before reading, as a fault would end us */
    int64_t code = scatter(&j, pages_len, blocks_len, n, chunk_size);
    *bad_chunk = j.bad;
    return code ? code : j.error ? THAW_PAGES_FAULT : 0;
}

/* ---- checked scatters in one run of the pool ------------------------------------------------------------------
 * A load of many tensors (thaw_mlx.load: one per layer and role) as one job for the pool: its threads wake once
 * and share the units of every scatter, where a call per tensor woke them per tensor and left them idle while
 * the caller prepared the next. Units are numbered across the scatters in order (first[k] is scatter k's first). */

typedef struct {
    page_job *jobs;
    size_t *first; /* count + 1 entries: first[count] is the total */
    size_t count;
} batch_job;

/* Unmap the whole memory pages inside a scatter's pages (a read-only mapping of a file: its pages stay in the
 * page cache), so a load of many tensors never maps the whole file at once. */
static void release_pages(page_job *j) {
#if defined(__linux__) && defined(MADV_DONTNEED)
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), start = (uintptr_t)j->pages;
    uintptr_t end = start + j->total_elems * j->layout->itemsize;
    start = (start + page - 1) / page * page;
    end = end / page * page;
    if (end > start) madvise((void *)start, end - start, MADV_DONTNEED);
#else
    (void)j;
#endif
}

static void batch_task(void *ctx, size_t index, int worker) {
    batch_job *b = ctx;
    size_t lo = 0, hi = b->count; /* the scatter k with first[k] <= index < first[k + 1] */
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if (b->first[mid] <= index) lo = mid; else hi = mid;
    }
    page_job *j = &b->jobs[lo];
    unit_task(j, index - b->first[lo], worker);
    if (j->release && __atomic_sub_fetch(&j->units_left, 1, __ATOMIC_ACQ_REL) == 0) release_pages(j);
}

int64_t thaw_scatter_pages_checked_batch(const thaw_checked_scatter *scatters, size_t count, int64_t *failed,
                                         int64_t *bad_chunk) {
    *failed = -1;
    *bad_chunk = -1;
    if (!count) return 0;
    if (guard_install()) return THAW_PAGES_FAULT;
    page_job *jobs = calloc(count, sizeof *jobs);
    size_t *first = malloc((count + 1) * sizeof *first);
    int64_t code = jobs && first ? 0 : THAW_PAGES_NO_MEMORY;
    size_t ready = 0, bytes = 0; /* jobs whose row order is allocated; bytes moved in all */
    for (size_t k = 0; !code && k < count; k++) {
        const thaw_checked_scatter *s = &scatters[k];
        jobs[k] = (page_job){(uint8_t *)s->pages, s->blocks, s->block_offsets, s->layout, 0, 0, 0, s->chunk_size,
                             NULL, 0, NULL, s->expected, -1, 0, 0, -1};
        jobs[k].release = s->release_pages;
        code = !s->expected ? THAW_PAGES_BAD_CHUNK
                            : scatter_ready(&jobs[k], s->pages_len, s->blocks_len, s->n, s->chunk_size);
        if (code) *failed = (int64_t)k;
    }
    for (; !code && ready < count; ready++) {
        if (row_order(&jobs[ready])) code = THAW_PAGES_NO_MEMORY;
    }
    if (!code) {
        first[0] = 0;
        for (size_t k = 0; k < count; k++) {
            first[k + 1] = first[k] + unit_count(&jobs[k]);
            jobs[k].units_left = first[k + 1] - first[k];
            bytes += jobs[k].total_elems * jobs[k].layout->itemsize;
        }
        batch_job b = {jobs, first, count};
        if (bytes < PARALLEL_MIN) {
            for (size_t u = 0; u < first[count]; u++) batch_task(&b, u, 0);
        } else {
            pool_run(first[count], batch_task, &b);
        }
        for (size_t k = 0; k < count && *failed < 0; k++) {
            if (jobs[k].error || jobs[k].bad >= 0) {
                *failed = (int64_t)k;
                *bad_chunk = jobs[k].error ? -1 : jobs[k].bad;
                code = jobs[k].error ? THAW_PAGES_FAULT : 0;
            }
        }
    }
    for (size_t k = 0; k < ready; k++) free(jobs[k].order);
    free(jobs);
    free(first);
    return code;
}

/* ---- scatter from another process's memory ---------------------------------------------------------------
 * Each unit (UNIT_BYTES of pages) is read with process_vm_readv into its thread's tile, a buffer allocated once
 * per thread and reused, so it is faulted in once and stays in cache between the read and the moves out of it;
 * then it moves as a local unit does. One pass over the source: no copy of the pages lands in this process. */

static pthread_key_t tile_key;
static pthread_once_t tile_once = PTHREAD_ONCE_INIT;

static int tile_key_made; /* 0 if pthread_key_create failed: no tiles then (ENOMEM), never another key's value */

static void make_tile_key(void) { tile_key_made = pthread_key_create(&tile_key, free) == 0; }

static uint8_t *thread_tile(void) {
    pthread_once(&tile_once, make_tile_key);
    if (!tile_key_made) return NULL;
    uint8_t *tile = pthread_getspecific(tile_key);
    if (!tile && !posix_memalign((void **)&tile, 4096, TILE_BYTES)) pthread_setspecific(tile_key, tile);
    return tile;
}

/* Read len bytes at `remote` in process pid into `out`; 0 or an errno (EFAULT for a short read). */
static int read_remote(int pid, uint64_t remote, uint8_t *out, size_t len) {
    while (len) {
        struct iovec local = {out, len}, far = {(void *)(uintptr_t)remote, len};
        ssize_t got = process_vm_readv(pid, &local, 1, &far, 1, 0);
        if (got < 0) return errno;
        if (got == 0) return EFAULT;
        out += got, remote += (uint64_t)got, len -= (size_t)got;
    }
    return 0;
}

static void remote_unit(page_job *j, size_t start, size_t end) {
    size_t isz = j->layout->itemsize;
    if (__atomic_load_n(&j->error, __ATOMIC_RELAXED)) return; /* the call fails anyway */
    uint8_t *tile = job_tile(j);
    if (!tile) return;
    int error = read_remote(j->pid, (uint64_t)(uintptr_t)j->pages + start * isz, tile, (end - start) * isz);
    if (error) {
        record_error(j, error);
        return;
    }
    page_job local = *j; /* the same job with its pages at the tile: element e of the unit is tile[e - start] */
    local.pages = (uint8_t *)((uintptr_t)tile - start * isz);
    move_range(&local, start, end);
    stream_fence();
}

int thaw_remote_readable(int pid, const uint64_t *addresses, const uint64_t *lens, size_t n) {
    uint8_t byte;
    for (size_t i = 0; i < n; i++) {
        if (!lens[i]) continue;
        int error = read_remote(pid, addresses[i], &byte, 1);
        if (!error) error = read_remote(pid, addresses[i] + lens[i] - 1, &byte, 1);
        if (error) return error;
    }
    return 0;
}

int64_t thaw_scatter_pages_remote(int pid, uint64_t pages, size_t pages_len, void *blocks, size_t blocks_len,
                                  const int64_t *block_offsets, size_t n, const thaw_page_layout *layout,
                                  int *error) {
    page_job j = {(uint8_t *)(uintptr_t)pages, blocks, block_offsets, layout, 0, 0, 0, 0, NULL, 0, NULL, NULL, -1,
                  pid, 0, -1};
    *error = pid > 0 ? thaw_remote_readable(pid, &pages, (uint64_t[]){pages_len}, 1) : ESRCH;
    if (*error) return THAW_PAGES_REMOTE; /* refused before any byte moves */
    int64_t code = scatter(&j, pages_len, blocks_len, n, UNIT_BYTES);
    *error = j.error;
    return code ? code : j.error ? THAW_PAGES_REMOTE : 0;
}
