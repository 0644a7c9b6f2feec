/* Helpers shared by the x86 kernels; every file that includes this is built with at least -msse4.2
 * -mpclmul. */
#ifndef THAW_CRC32C_X86_H
#define THAW_CRC32C_X86_H

#include <immintrin.h>
#include <string.h>

#include "crc32c_impl.h"

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* k for moving a state past len bytes: x^(8*len - 33) mod P. */
#define SHIFT_K(len) crc32c_xpow(8 * (uint64_t)(len) - 33)

/* state * x^(8*len) mod P, given k = SHIFT_K(len): the carry-less product is exact in 63 bits, and crc32
 * of it multiplies by the remaining x^33 and reduces. */
static inline uint32_t shift(uint32_t state, uint32_t k) {
    __m128i prod = _mm_clmulepi64_si128(_mm_cvtsi32_si128((int)state), _mm_cvtsi32_si128((int)k), 0);
    return (uint32_t)_mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(prod));
}

/* Fold constants for moving 128-bit blocks forward by `bits`: the high-degree half of a block (its first
 * 8 bytes) is multiplied by x^(bits+31), the low-degree half by x^(bits-33). */
static inline __m128i fold_k128(unsigned bits) {
    return _mm_set_epi64x(crc32c_xpow(bits - 33), crc32c_xpow(bits + 31));
}

static inline __m128i fold128(__m128i x, __m128i k) {
    return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
}

/* The CRC state after a 128-bit block x that already holds the incoming state in its first 4 bytes. */
static inline uint32_t crc_of_block(__m128i x) {
    uint64_t s = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(x));
    return (uint32_t)_mm_crc32_u64(s, (uint64_t)_mm_extract_epi64(x, 1));
}

#if defined(__AVX512F__)
/* A 512-bit accumulator's four 128-bit lanes reduced to one block: lanes 0, 1 and 2 folded forward past the lanes
 * after them (k384, k256, k128: fold_k128 of 384, 256 and 128 bits) and added to lane 3. */
static inline __m128i reduce512(__m512i x, __m128i k384, __m128i k256, __m128i k128) {
    __m128i y = _mm_xor_si128(fold128(_mm512_extracti32x4_epi32(x, 0), k384),
                              fold128(_mm512_extracti32x4_epi32(x, 1), k256));
    y = _mm_xor_si128(y, fold128(_mm512_extracti32x4_epi32(x, 2), k128));
    return _mm_xor_si128(y, _mm512_extracti32x4_epi32(x, 3));
}
#endif
#endif
