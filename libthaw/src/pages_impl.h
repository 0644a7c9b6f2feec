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
#endif

#endif
