/* CRC32C by carry-less multiply folding on 512-bit vectors (AVX-512F + VPCLMULQDQ: Intel Ice Lake server
 * and later, AMD Zen 4 and later), where one fold step outruns the scalar crc32 instruction several times
 * over. Four accumulators of four 128-bit blocks fold 256 bytes a step, then collapse into one block whose
 * CRC the crc32 instruction finishes. Built with -mavx512f -mavx512vl -mvpclmulqdq -mpclmul -msse4.2.
 * Inputs under 512 bytes go to the SSE4.2 kernel. */
#include "crc32c_x86.h"

static __m512i by2048, by1536, by1024, by512;
static __m128i by384, by256, by128;

static __m512i fold_k512(unsigned bits) { return _mm512_broadcast_i32x4(fold_k128(bits)); }

void crc32c_avx512_vpclmul_init(void) {
    by2048 = fold_k512(2048);
    by1536 = fold_k512(1536);
    by1024 = fold_k512(1024);
    by512 = fold_k512(512);
    by384 = fold_k128(384);
    by256 = fold_k128(256);
    by128 = fold_k128(128);
}

/* x folded forward by the distance k was made for, plus (xor) y, with one three-way xor. */
static inline __m512i fold_add(__m512i x, __m512i k, __m512i y) {
    return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11),
                                     y, 0x96);
}

#define LOAD(p) _mm512_loadu_si512((const void *)(p))

uint32_t crc32c_avx512_vpclmul(uint32_t state, const uint8_t *p, size_t n) {
    if (n < 512) return crc32c_sse42(state, p, n);
    __m512i x0 = _mm512_xor_si512(LOAD(p), _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)state)));
    __m512i x1 = LOAD(p + 64), x2 = LOAD(p + 128), x3 = LOAD(p + 192);
    for (p += 256, n -= 256; n >= 256; p += 256, n -= 256) {
        x0 = fold_add(x0, by2048, LOAD(p));
        x1 = fold_add(x1, by2048, LOAD(p + 64));
        x2 = fold_add(x2, by2048, LOAD(p + 128));
        x3 = fold_add(x3, by2048, LOAD(p + 192));
    }
    x3 = fold_add(x0, by1536, x3);
    x3 = fold_add(x1, by1024, x3);
    x3 = fold_add(x2, by512, x3);
    for (; n >= 64; p += 64, n -= 64) x3 = fold_add(x3, by512, LOAD(p));
    __m128i x = reduce512(x3, by384, by256, by128);
    for (; n >= 16; p += 16, n -= 16) x = _mm_xor_si128(fold128(x, by128), _mm_loadu_si128((const __m128i *)p));
    return crc32c_sse42(crc_of_block(x), p, n);
}
