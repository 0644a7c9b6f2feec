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

/* A CRC32C computed while its bytes are copied in rows (pages.c's checked scatter and its gather with CRCs: one
 * read of each byte). The state carries across calls: lanes are the 4 x 256-bit folding accumulators, raw the
 * incoming raw state, started whether any 128-byte step was folded. */
typedef struct {
    _Alignas(32) uint8_t lanes[128];
    uint32_t raw;
    int started;
} crc32c_fold;

/* Fold `rows` rows of row_bytes (a multiple of 128), in order: row i is read at src[i] and stored at dst[i].
 * `after` is the row the caller reads next (the first of its next call), prefetched while the last row moves,
 * or NULL where none follows. */
typedef void (*crc32c_fold_rows_fn)(crc32c_fold *f, const uint8_t *const *src, uint8_t *const *dst, size_t rows,
                                    size_t row_bytes, const uint8_t *after);
/* The folding copy of the active kernel (crc32c.c), or NULL where it has none (the caller then checks and
 * copies in two reads). */
crc32c_fold_rows_fn crc32c_fold_rows(void);
void crc32c_fold_start(crc32c_fold *f, uint32_t raw);
uint32_t crc32c_fold_end(const crc32c_fold *f); /* the raw state after every byte folded */

uint32_t crc32c_sw(uint32_t state, const uint8_t *p, size_t n);
void crc32c_sw_init(void);

#if defined(__x86_64__) || defined(_M_X64)
/* CPU_AVX512: AVX-512F and VL */
enum { CPU_SSE42 = 1, CPU_PCLMUL = 2, CPU_AVX2_VPCLMUL = 4, CPU_AVX512_VPCLMUL = 8, CPU_AVX2 = 16, CPU_AVX512 = 32 };
unsigned cpu_x86_features(void);

uint32_t crc32c_sse42(uint32_t state, const uint8_t *p, size_t n);
uint32_t crc32c_avx2_vpclmul(uint32_t state, const uint8_t *p, size_t n);
void crc32c_avx2_fold_rows(crc32c_fold *f, const uint8_t *const *src, uint8_t *const *dst, size_t rows,
                           size_t row_bytes, const uint8_t *after);
uint32_t crc32c_avx2_fold_end(const crc32c_fold *f);
uint32_t crc32c_avx512_vpclmul(uint32_t state, const uint8_t *p, size_t n);
/* 1 where the active kernel is the AVX-512 one (a test may have selected another): pages.c's summing 16 x 16
 * tiles fold with the same instructions, and step aside where the CRC32C kernel was chosen otherwise. */
int crc32c_folds_512(void);
void crc32c_sse42_init(void);
void crc32c_avx2_vpclmul_init(void);
void crc32c_avx512_vpclmul_init(void);
#endif

#if defined(__aarch64__)
int cpu_arm64_has_crc(void);
uint32_t crc32c_armv8(uint32_t state, const uint8_t *p, size_t n);
#endif

#endif
