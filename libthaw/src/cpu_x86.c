/* Which x86 CRC32C paths this CPU and OS can run: cpuid for the instructions, xgetbv for the OS saving the
 * vector registers they use. */
#include <cpuid.h>

#include "crc32c_impl.h"

static unsigned long long xgetbv0(void) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

unsigned cpu_x86_features(void) {
    unsigned a, b, c, d, features = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    if (c & bit_SSE4_2) features |= CPU_SSE42;
    if (c & bit_PCLMUL) features |= CPU_PCLMUL;
    if (!(c & bit_OSXSAVE) || __get_cpuid_max(0, 0) < 7) return features;
    unsigned long long xcr0 = xgetbv0();
    __cpuid_count(7, 0, a, b, c, d);
    int ymm = (xcr0 & 0x6) == 0x6, zmm = (xcr0 & 0xe6) == 0xe6;
    int vpclmul = (c & bit_VPCLMULQDQ) != 0;
    if (ymm && (b & bit_AVX2)) features |= CPU_AVX2;
    if (ymm && vpclmul && (b & bit_AVX2)) features |= CPU_AVX2_VPCLMUL;
    if (zmm && (b & bit_AVX512F) && (b & bit_AVX512VL)) features |= CPU_AVX512;
    if (zmm && vpclmul && (b & bit_AVX512F) && (b & bit_AVX512VL)) features |= CPU_AVX512_VPCLMUL;
    return features;
}
