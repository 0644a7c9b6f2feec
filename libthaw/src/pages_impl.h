/* The CPU-specific page-move kernels pages.c dispatches to. */
#ifndef THAW_PAGES_IMPL_H
#define THAW_PAGES_IMPL_H

#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) || defined(_M_X64)
/* Move the [w, 8] matrix at `strided` (rows stride_bytes apart) to or from 8 flat rows of w 4-byte elements,
 * in 8 x 8 tiles; returns the columns moved (a multiple of 8, the rest is the caller's). Needs AVX2. */
size_t pages_tiles8_avx2(uint8_t *const *flat, uint8_t *strided, int64_t stride_bytes, size_t w, int to_flat);
/* Scatter 16 flat rows of w 4-byte elements into the [w, 16] matrix at `strided`, each of its rows one whole
 * 64-byte line (strided and stride_bytes multiples of 64), with streaming stores; returns the columns moved (a
 * multiple of 8). The caller fences. Needs AVX2. */
size_t pages_stream16_avx2(uint8_t *const *flat, uint8_t *strided, int64_t stride_bytes, size_t w);
/* Scatter 16 flat rows of w 4-byte elements into the [w, 16] matrix at `strided`, each of its rows one whole
 * 64-byte line (strided and stride_bytes multiples of 64: streaming stores fault on unaligned addresses), in
 * 16 x 16 tiles, each line written by one streaming store; moves all w columns (the last w % 16 in a masked tile)
 * and writes no line past column w. The caller fences. Needs AVX-512F and VL. */
size_t pages_stream16_avx512(uint8_t *const *flat, uint8_t *strided, int64_t stride_bytes, size_t w);
/* Gather the [w, 16] matrix at `strided` (rows stride_bytes apart, each one 64-byte run) into 16 flat rows of w
 * 4-byte elements, in 16 x 16 tiles; returns the columns moved (a multiple of 16). Needs AVX-512F and VL. */
size_t pages_gather16_avx512(uint8_t *const *flat, const uint8_t *strided, int64_t stride_bytes, size_t w);

/* The fold constants of pages_gather16_crc_avx512 for pages of page_rows rows of row_bytes (a multiple of 64):
 * 128-bit pairs as fold_k128 makes them. */
typedef struct pages_crc16 {
    size_t row_bytes, page_rows;
    uint64_t step[2], lanes[3][2]; /* 64 bytes along a row; a row's last 64 bytes reduced to one block */
    uint64_t (*rows)[2];           /* rows[m]: m rows forward, 1 <= m <= page_rows (rows[page_rows]: a page) */
    uint64_t (*lines)[4][2];       /* lines[m][j]: 128-bit lane j of a row's last 64 bytes moved past the rest of
                                    * its row and the m rows after it, 1 <= m < page_rows (64-byte aligned) */
    struct pages_crc16 *next;      /* pages_crc16_for's next table */
} pages_crc16;
/* The table for that page shape, made on its first use and kept (read by every thread); NULL out of memory. */
const pages_crc16 *pages_crc16_for(size_t rows, size_t row_bytes);
/* pages_gather16_avx512 of whole rows (row_bytes) for `groups` (1, 2 or 4) groups of 16 flat rows, group t's
 * sources 64 * t bytes after the first's, that also adds each row's CRC contribution, moved to the end of its page
 * (after[i]: the rows that follow flat row i in its page), into the 128-bit page_block; the rows go with streaming
 * stores where all 16 * groups are 64-byte aligned (the caller fences). Needs AVX-512F, VL and VPCLMULQDQ. */
void pages_gather16_crc_avx512(uint8_t *const *flat, const uint8_t *strided, int64_t stride_bytes,
                               const pages_crc16 *k, const size_t *after, uint8_t *page_block, int groups);
/* unit_block = unit_block moved a page forward + page_block: pages in order (unit_block starts as zeros). */
void pages_crc16_next_page(const pages_crc16 *k, uint8_t *unit_block, const uint8_t *page_block);
/* The CRC32C of the len bytes whose pages were summed into unit_block. */
uint32_t pages_crc16_end(const uint8_t *unit_block, size_t len);
#endif

#endif
