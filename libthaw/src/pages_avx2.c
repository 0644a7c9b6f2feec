/* pages.c's transposed tile for 4-byte elements in AVX2: 8 rows of 8 elements per 8 x 8 register transpose,
 * half the passes over a transposed K block of the 4 x 4 SSE2 tile (measured: about a quarter less CPU for
 * float32 K). pages.c calls it only where cpu_x86_features() reports AVX2. */
#include <immintrin.h>

#include "pages_impl.h"

static inline void transpose8x8(__m256 *r) {
    __m256 t[8], s[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x20);
        r[4 + i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x31);
    }
}

static inline __attribute__((always_inline)) size_t tiles(uint8_t *const *flat, uint8_t *strided,
                                                          int64_t stride_bytes, size_t w, int to_flat) {
    float *f[8];
    for (int i = 0; i < 8; i++) f[i] = (float *)flat[i];
    size_t c = 0;
    __m256 r[8];
    for (; c + 8 <= w; c += 8) {
        uint8_t *s = strided + (int64_t)c * stride_bytes;
        for (int i = 0; i < 8; i++)
            r[i] = _mm256_loadu_ps(to_flat ? (const float *)(s + i * stride_bytes) : f[i] + c);
        transpose8x8(r);
        for (int i = 0; i < 8; i++) _mm256_storeu_ps(to_flat ? f[i] + c : (float *)(s + i * stride_bytes), r[i]);
    }
    return c;
}

size_t pages_tiles8_avx2(uint8_t *const *flat, uint8_t *strided, int64_t stride_bytes, size_t w, int to_flat) {
    return to_flat ? tiles(flat, strided, stride_bytes, w, 1) : tiles(flat, strided, stride_bytes, w, 0);
}

/* A scatter of 16 flat rows into whole 64-byte lines: two 8 x 8 transposes per 8 columns, and each line
 * written by two back-to-back streaming stores, so it is neither read into the cache first (as a plain store
 * reads it: a third more memory traffic, which made a transposed K cost twice a plain V) nor left half-written
 * in a write-combining buffer. pages.c checks the alignment and fences after its rows. */
size_t pages_stream16_avx2(uint8_t *const *flat, uint8_t *strided, int64_t stride_bytes, size_t w) {
    const float *f[16];
    for (int i = 0; i < 16; i++) f[i] = (const float *)flat[i];
    size_t c = 0;
    __m256 lo[8], hi[8];
    for (; c + 8 <= w; c += 8) {
        uint8_t *s = strided + (int64_t)c * stride_bytes;
        for (int i = 0; i < 8; i++) {
            lo[i] = _mm256_loadu_ps(f[i] + c);
            hi[i] = _mm256_loadu_ps(f[8 + i] + c);
        }
        transpose8x8(lo);
        transpose8x8(hi);
        for (int i = 0; i < 8; i++) {
            float *line = (float *)(s + i * stride_bytes);
            _mm256_stream_ps(line, lo[i]);
            _mm256_stream_ps(line + 8, hi[i]);
        }
    }
    return c;
}
