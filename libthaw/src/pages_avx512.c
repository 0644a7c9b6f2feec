/* pages.c's transposed tiles for 4-byte elements in AVX-512: a gather of 16 strided rows of one whole 64-byte line
 * each (16 tokens of a vLLM float32 K row) to 16 flat rows per 16 x 16 register transpose, its scatter (whole
 * lines out with streaming stores), and a gather variant that also sums what it writes into the CRC32C of its
 * pages (VPCLMULQDQ), so that the pages can be written with streaming stores and never read back. pages.c calls
 * them only where cpu_x86_features() reports AVX-512F and VL (and the CRC32C kernel in use is the AVX-512 one, for
 * the summing variant). Built with -mavx512f -mavx512vl -mvpclmulqdq -mpclmul -msse4.2. */
#include <stdlib.h>

#include "crc32c_x86.h"
#include "pages_impl.h"

/* r[i] = row i of a 16 x 16 matrix of 4-byte elements, transposed in place: four rounds of two-source shuffles
 * (pairs of elements, pairs of pairs, then 128-bit lanes twice). */
static inline void transpose16x16(__m512i *r) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* r[4i + j], lane L: elements 4L + j of rows 4i .. 4i + 3 */
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        t[j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);      /* lanes 0, 2 of rows 0-3 and 4-7 */
        t[4 + j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);  /* lanes 1, 3 */
        t[8 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);           /* element j */
        r[4 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0x88);  /* element 4 + j */
        r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);       /* element 8 + j */
        r[12 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0xdd); /* element 12 + j */
    }
}

static inline void load16(__m512i *r, const uint8_t *s, int64_t stride_bytes) {
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const void *)(s + i * stride_bytes));
}

size_t pages_gather16_avx512(uint8_t *const *flat, const uint8_t *strided, int64_t stride_bytes, size_t w) {
    size_t c = 0;
    __m512i r[16];
    for (; c + 16 <= w; c += 16) {
        load16(r, strided + (int64_t)c * stride_bytes, stride_bytes);
        transpose16x16(r);
        for (int i = 0; i < 16; i++) _mm512_storeu_si512((void *)(flat[i] + c * 4), r[i]);
    }
    return c;
}

/* A tile of 16 flat rows' columns [c, c + n) into n whole lines (n <= 16; the loads past n are masked off). */
static inline __attribute__((always_inline)) void stream_tile(uint8_t *const *flat, uint8_t *s, int64_t stride_bytes,
                                                              size_t c, size_t n) {
    __m512i r[16];
    __mmask16 keep = (__mmask16)((1u << n) - 1);
    for (int i = 0; i < 16; i++)
        r[i] = n == 16 ? _mm512_loadu_si512((const void *)(flat[i] + c * 4))
                       : _mm512_maskz_loadu_epi32(keep, (const void *)(flat[i] + c * 4));
    transpose16x16(r);
    for (size_t i = 0; i < n; i++) _mm512_stream_si512((void *)(s + (int64_t)i * stride_bytes), r[i]);
}

/* The scatter: each flat row read a whole 64-byte line at a time (the AVX2 tile reads half lines, twice), each
 * strided line written by one streaming store. */
size_t pages_stream16_avx512(uint8_t *const *flat, uint8_t *strided, int64_t stride_bytes, size_t w) {
    size_t c = 0;
    for (; c + 16 <= w; c += 16) stream_tile(flat, strided + (int64_t)c * stride_bytes, stride_bytes, c, 16);
    if (c < w) stream_tile(flat, strided + (int64_t)c * stride_bytes, stride_bytes, c, w - c);
    return w;
}

/* ---- the summing variant ---------------------------------------------------------------------------------
 * A page's rows arrive in the blocks' order (head by head), not in the page's, so each row is summed on its own
 * and moved to its place: along a row, 64 bytes a step folded into one 512-bit accumulator (as the CRC32C kernel
 * folds), whose four 128-bit lanes are at the row's end folded forward past the rest of the row and the rows that
 * follow it in its page (lines[m]) and added into the page's block. A page's block is folded forward by a page
 * and added into the unit's, pages in order; the unit's block, reduced by the crc32 instruction and corrected for
 * the initial state, is the CRC32C of the unit's bytes. */

static void put_k(uint64_t *k, unsigned bits) { _mm_storeu_si128((__m128i *)k, fold_k128(bits)); }

/* A new table for pages of `rows` rows of row_bytes, or NULL out of memory. */
static pages_crc16 *crc16_new(size_t rows, size_t row_bytes) {
    pages_crc16 *k = malloc(sizeof *k);
    uint64_t (*by_rows)[2] = malloc((rows + 1) * sizeof *by_rows);
    void *lines = NULL; /* one 512-bit load a row: each entry on its own 64-byte line */
    if (posix_memalign(&lines, 64, rows * sizeof(uint64_t[4][2]))) lines = NULL;
    if (!k || !by_rows || !lines) {
        free(k);
        free(by_rows);
        free(lines);
        return NULL;
    }
    *k = (pages_crc16){.row_bytes = row_bytes, .page_rows = rows, .rows = by_rows, .lines = lines};
    put_k(k->step, 512);
    put_k(k->lanes[0], 384);
    put_k(k->lanes[1], 256);
    put_k(k->lanes[2], 128);
    /* rows[m] = fold_k128(m * row bits), by one carry-less shift of rows[m - 1] each */
    const uint32_t next = SHIFT_K(row_bytes);
    put_k(k->rows[1], 8 * row_bytes);
    for (size_t m = 2; m <= rows; m++)
        for (int h = 0; h < 2; h++) k->rows[m][h] = shift((uint32_t)k->rows[m - 1][h], next);
    /* lines[m][j] = fold_k128(m * row bits + (3 - j) * 128): lane j then the rows after it, in one fold (a page's
     * last row, m = 0, is reduced on its own: lines[0] is not read) */
    const uint32_t lane[3] = {SHIFT_K(48), SHIFT_K(32), SHIFT_K(16)};
    for (size_t m = 1; m < rows; m++)
        for (int h = 0; h < 2; h++) {
            for (int j = 0; j < 3; j++) k->lines[m][j][h] = shift((uint32_t)k->rows[m][h], lane[j]);
            k->lines[m][3][h] = k->rows[m][h];
        }
    return k;
}

/* The tables made so far, newest first, each kept for the life of the process: a process meets few page shapes
 * (one per model it serves), and a table is two allocations and about 8 carry-less shifts a page row (its rows and
 * lines), which a gather per layer and role would otherwise repeat. Published by compare-and-swap and never changed
 * after, so they are read without a lock (none to be left held in a fork child). */
static pages_crc16 *crc16_tables;

const pages_crc16 *pages_crc16_for(size_t rows, size_t row_bytes) {
    pages_crc16 *head = __atomic_load_n(&crc16_tables, __ATOMIC_ACQUIRE);
    for (pages_crc16 *k = head; k; k = k->next)
        if (k->page_rows == rows && k->row_bytes == row_bytes) return k;
    pages_crc16 *k = crc16_new(rows, row_bytes);
    if (!k) return NULL;
    k->next = head;
    if (__atomic_compare_exchange_n(&crc16_tables, &k->next, k, 0, __ATOMIC_RELEASE, __ATOMIC_ACQUIRE)) return k;
    free(k->rows); /* another thread added a table first (maybe this one): look again */
    free(k->lines);
    free(k);
    return pages_crc16_for(rows, row_bytes);
}

#define K128(k) _mm_loadu_si128((const __m128i *)(k))

static inline __m512i fold512(__m512i x, __m512i k, __m512i y) {
    return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11),
                                     y, 0x96);
}

/* G groups of 16 rows whose sources lie 64 bytes apart: for each 16 columns the G tiles read G neighbouring
 * lines of each source row, so a row of 16 * G elements (a block_size of 16 * G tokens) is read front to back
 * rather than one line in G at a time (a stride the hardware prefetchers follow poorly). */
static inline __attribute__((always_inline)) void gather_crc(uint8_t *const *flat, const uint8_t *strided,
                                                             int64_t stride_bytes, const pages_crc16 *k,
                                                             const size_t *after, uint8_t *page_block, int g) {
    const __m512i step = _mm512_broadcast_i32x4(K128(k->step));
    __m512i r[16], sums[4 * 16];
    int stream = 1;
    for (int i = 0; i < 16 * g; i++) stream &= ((uintptr_t)flat[i] & 63) == 0;
    for (size_t c = 0; c < k->row_bytes / 4; c += 16)
        for (int t = 0; t < g; t++) {
            load16(r, strided + (int64_t)c * stride_bytes + 64 * t, stride_bytes);
            transpose16x16(r);
            for (int i = 0; i < 16; i++) {
                uint8_t *to = flat[16 * t + i] + c * 4;
                if (stream)
                    _mm512_stream_si512((void *)to, r[i]);
                else
                    _mm512_storeu_si512((void *)to, r[i]);
                sums[16 * t + i] = c ? fold512(sums[16 * t + i], step, r[i]) : r[i];
            }
        }
    /* Each row's four lanes moved to the page's end by one 512-bit fold (lines[after]), then the lanes added: 4
     * instructions a row, where reducing each row to 128 bits first took about 17. */
    __m128i page = K128(page_block);
    __m512i moved = _mm512_setzero_si512();
    for (int i = 0; i < 16 * g; i++) {
        if (!after[i]) { /* a page's last row: no rows to move past, its lanes reduced to one block */
            page = _mm_xor_si128(page, reduce512(sums[i], K128(k->lanes[0]), K128(k->lanes[1]), K128(k->lanes[2])));
            continue;
        }
        const __m512i m = _mm512_load_si512((const void *)k->lines[after[i]]);
        moved = _mm512_ternarylogic_epi64(moved, _mm512_clmulepi64_epi128(sums[i], m, 0x00),
                                          _mm512_clmulepi64_epi128(sums[i], m, 0x11), 0x96);
    }
    __m128i lo = _mm512_extracti32x4_epi32(moved, 0), hi = _mm512_extracti32x4_epi32(moved, 1);
    page = _mm_ternarylogic_epi64(page, lo, hi, 0x96);
    lo = _mm512_extracti32x4_epi32(moved, 2), hi = _mm512_extracti32x4_epi32(moved, 3);
    page = _mm_ternarylogic_epi64(page, lo, hi, 0x96);
    _mm_storeu_si128((__m128i *)page_block, page);
}

void pages_gather16_crc_avx512(uint8_t *const *flat, const uint8_t *strided, int64_t stride_bytes,
                               const pages_crc16 *k, const size_t *after, uint8_t *page_block, int groups) {
    switch (groups) {
    case 1: gather_crc(flat, strided, stride_bytes, k, after, page_block, 1); break;
    case 2: gather_crc(flat, strided, stride_bytes, k, after, page_block, 2); break;
    case 4: gather_crc(flat, strided, stride_bytes, k, after, page_block, 4); break;
    default: abort(); /* move_summed16 plans 1, 2 or 4 groups */
    }
}

void pages_crc16_next_page(const pages_crc16 *k, uint8_t *unit_block, const uint8_t *page_block) {
    __m128i unit = fold128(K128(unit_block), K128(k->rows[k->page_rows]));
    _mm_storeu_si128((__m128i *)unit_block, _mm_xor_si128(unit, K128(page_block)));
}

uint32_t pages_crc16_end(const uint8_t *unit_block, size_t len) {
    /* from a zero state; the real one (all ones) moved past len bytes is added */
    return ~(crc_of_block(K128(unit_block)) ^ shift(~0u, SHIFT_K(len)));
}
