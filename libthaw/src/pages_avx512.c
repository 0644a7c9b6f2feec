/* pages.c's transposed gather tile for 4-byte elements in AVX-512: 16 strided rows of one whole 64-byte line
 * each (16 tokens of a vLLM float32 K row) to 16 flat rows per 16 x 16 register transpose, and a variant that
 * also sums what it writes into the CRC32C of its pages (VPCLMULQDQ), so that the pages can be written with
 * streaming stores and never read back. pages.c calls them only where cpu_x86_features() reports AVX-512F and VL
 * (and the CRC32C kernel in use is the AVX-512 one, for the summing variant). Built with -mavx512f -mavx512vl
 * -mvpclmulqdq -mpclmul -msse4.2. */
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

/* ---- the summing variant ---------------------------------------------------------------------------------
 * A page's rows arrive in the blocks' order (head by head), not in the page's, so each row is summed on its own
 * and moved to its place: along a row, 64 bytes a step folded into one 512-bit accumulator (as the CRC32C kernel
 * folds), reduced at the row's end to one 128-bit block, which is then folded forward by the rows that follow it
 * in its page (rows[m]) and added into the page's block. A page's block is folded forward by a page and added into
 * the unit's, pages in order; the unit's block, reduced by the crc32 instruction and corrected for the initial
 * state, is the CRC32C of the unit's bytes. */

static void put_k(uint64_t *k, unsigned bits) { _mm_storeu_si128((__m128i *)k, fold_k128(bits)); }

int pages_crc16_init(pages_crc16 *k, size_t rows, size_t row_bytes) {
    k->row_bytes = row_bytes;
    k->rows = malloc((rows + 1) * sizeof *k->rows);
    if (!k->rows) return -1;
    put_k(k->step, 512);
    put_k(k->lanes[0], 384);
    put_k(k->lanes[1], 256);
    put_k(k->lanes[2], 128);
    /* rows[m] = fold_k128(m * row bits), by one carry-less shift of rows[m - 1] each */
    const uint32_t next = SHIFT_K(row_bytes);
    put_k(k->rows[1], 8 * row_bytes);
    for (size_t m = 2; m <= rows; m++)
        for (int h = 0; h < 2; h++) k->rows[m][h] = shift((uint32_t)k->rows[m - 1][h], next);
    return 0;
}

void pages_crc16_free(pages_crc16 *k) { free(k->rows); }

#define K128(k) _mm_loadu_si128((const __m128i *)(k))

static inline __m512i fold512(__m512i x, __m512i k, __m512i y) {
    return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11),
                                     y, 0x96);
}

void pages_gather16_crc_avx512(uint8_t *const *flat, const uint8_t *strided, int64_t stride_bytes,
                               const pages_crc16 *k, const size_t *after, uint8_t *page_block) {
    const __m512i step = _mm512_broadcast_i32x4(K128(k->step));
    __m512i r[16], sums[16];
    int stream = 1;
    for (int i = 0; i < 16; i++) stream &= ((uintptr_t)flat[i] & 63) == 0;
    for (size_t c = 0; c < k->row_bytes / 4; c += 16) {
        load16(r, strided + (int64_t)c * stride_bytes, stride_bytes);
        transpose16x16(r);
        for (int i = 0; i < 16; i++) {
            if (stream)
                _mm512_stream_si512((void *)(flat[i] + c * 4), r[i]);
            else
                _mm512_storeu_si512((void *)(flat[i] + c * 4), r[i]);
            sums[i] = c ? fold512(sums[i], step, r[i]) : r[i];
        }
    }
    __m128i page = K128(page_block);
    for (int i = 0; i < 16; i++) {
        __m128i x = _mm_xor_si128(fold128(_mm512_extracti32x4_epi32(sums[i], 0), K128(k->lanes[0])),
                                  fold128(_mm512_extracti32x4_epi32(sums[i], 1), K128(k->lanes[1])));
        x = _mm_xor_si128(x, fold128(_mm512_extracti32x4_epi32(sums[i], 2), K128(k->lanes[2])));
        x = _mm_xor_si128(x, _mm512_extracti32x4_epi32(sums[i], 3));
        page = _mm_xor_si128(page, after[i] ? fold128(x, K128(k->rows[after[i]])) : x);
    }
    _mm_storeu_si128((__m128i *)page_block, page);
}

void pages_crc16_next_page(const pages_crc16 *k, size_t rows, uint8_t *unit_block, const uint8_t *page_block) {
    __m128i unit = fold128(K128(unit_block), K128(k->rows[rows]));
    _mm_storeu_si128((__m128i *)unit_block, _mm_xor_si128(unit, K128(page_block)));
}

uint32_t pages_crc16_end(const uint8_t *unit_block, size_t len) {
    /* from a zero state; the real one (all ones) moved past len bytes is added */
    return ~(crc_of_block(K128(unit_block)) ^ shift(~0u, SHIFT_K(len)));
}
