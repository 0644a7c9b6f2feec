/* What the CRC32C implementations share. Each kernel updates a raw (pre-inverted) CRC state; the public
 * functions in crc32c.c do the inversion and the single dispatch. */
#ifndef THAW_CRC32C_IMPL_H
#define THAW_CRC32C_IMPL_H

#include <stddef.h>
#include <stdint.h>

#define CRC32C_POLY 0x82F63B78u /* reflected Castagnoli polynomial */

typedef uint32_t (*crc32c_kernel)(uint32_t state, const uint8_t *p, size_t n);

/* x^n mod P in the reflected representation (bit 31 is x^0), computed in software. */
uint32_t crc32c_xpow(uint64_t n);

uint32_t crc32c_sw(uint32_t state, const uint8_t *p, size_t n);
void crc32c_sw_init(void);

#if defined(__x86_64__) || defined(_M_X64)
enum { CPU_SSE42 = 1, CPU_PCLMUL = 2, CPU_AVX2_VPCLMUL = 4, CPU_AVX512_VPCLMUL = 8, CPU_AVX2 = 16 };
unsigned cpu_x86_features(void);

uint32_t crc32c_sse42(uint32_t state, const uint8_t *p, size_t n);
uint32_t crc32c_avx2_vpclmul(uint32_t state, const uint8_t *p, size_t n);
uint32_t crc32c_avx512_vpclmul(uint32_t state, const uint8_t *p, size_t n);
void crc32c_sse42_init(void);
void crc32c_avx2_vpclmul_init(void);
void crc32c_avx512_vpclmul_init(void);
#endif

#if defined(__aarch64__)
int cpu_arm64_has_crc(void);
uint32_t crc32c_armv8(uint32_t state, const uint8_t *p, size_t n);
#endif

#endif
