/* CRC32C for CPUs with VPCLMULQDQ on 256-bit vectors but no AVX-512 (e.g. AMD Zen 3). There, folding
 * with carry-less multiplies and the scalar crc32 instruction each reach about 8 bytes a cycle on their
 * own but use different execution ports, so this kernel runs both at once: each block is cut into a
 * vector part, folded 128 bytes a step by four 256-bit accumulators, followed by three scalar streams of
 * 40 bytes a step; the four states are joined by carry-less shifts. Built with -mavx2 -mvpclmulqdq
 * -mpclmul -msse4.2. */
#include "crc32c_x86.h"

enum { VECTOR_STEP = 128, SCALAR_STEP = 40, STEP = VECTOR_STEP + 3 * SCALAR_STEP };

/* Blocks of BIG_STEPS steps (about 31 KiB) carry the bulk; SMALL_STEPS blocks (about 2 KiB) the rest. */
enum { BIG_STEPS = 128, SMALL_STEPS = 8 };

typedef struct {
    uint32_t past_scalar, past_two, past_one; /* shift multipliers for 3, 2 and 1 scalar streams */
} block_k;

static block_k big_k, small_k;
static __m256i by1024, by768, by512, by256;
static __m128i by128;

static __m256i fold_k256(unsigned bits) { return _mm256_broadcastsi128_si256(fold_k128(bits)); }

static block_k make_block_k(size_t steps) {
    return (block_k){SHIFT_K(3 * SCALAR_STEP * steps), SHIFT_K(2 * SCALAR_STEP * steps),
                     SHIFT_K(SCALAR_STEP * steps)};
}

void crc32c_avx2_vpclmul_init(void) {
    by1024 = fold_k256(1024);
    by768 = fold_k256(768);
    by512 = fold_k256(512);
    by256 = fold_k256(256);
    by128 = fold_k128(128);
    big_k = make_block_k(BIG_STEPS);
    small_k = make_block_k(SMALL_STEPS);
}

static inline __m256i fold(__m256i x, __m256i k) {
    return _mm256_xor_si256(_mm256_clmulepi64_epi128(x, k, 0x00), _mm256_clmulepi64_epi128(x, k, 0x11));
}

#define LOAD(p) _mm256_loadu_si256((const __m256i *)(p))

#define SCALAR_STEP_AT(s, len)                                     \
    for (int j = 0; j < SCALAR_STEP; j += 8) {                     \
        c0 = _mm_crc32_u64(c0, load64((s) + j));                   \
        c1 = _mm_crc32_u64(c1, load64((s) + (len) + j));           \
        c2 = _mm_crc32_u64(c2, load64((s) + 2 * (len) + j));       \
    }

/* The raw state after four accumulators that each fold every fourth 32 bytes of one stream. */
static inline uint32_t reduce4(__m256i x0, __m256i x1, __m256i x2, __m256i x3) {
    x3 = _mm256_xor_si256(_mm256_xor_si256(x3, fold(x0, by768)), _mm256_xor_si256(fold(x1, by512), fold(x2, by256)));
    __m128i x = _mm_xor_si128(fold128(_mm256_castsi256_si128(x3), by128), _mm256_extracti128_si256(x3, 1));
    return crc_of_block(x);
}

static uint32_t block(uint32_t state, const uint8_t *p, size_t steps, const block_k *k) {
    const size_t stream = SCALAR_STEP * steps;
    const uint8_t *s = p + VECTOR_STEP * steps;
    uint64_t c0 = 0, c1 = 0, c2 = 0;
    __m256i x0 = _mm256_xor_si256(LOAD(p), _mm256_setr_epi32((int)state, 0, 0, 0, 0, 0, 0, 0));
    __m256i x1 = LOAD(p + 32), x2 = LOAD(p + 64), x3 = LOAD(p + 96);
    SCALAR_STEP_AT(s, stream);
    for (size_t i = 1; i < steps; i++) {
        p += VECTOR_STEP;
        s += SCALAR_STEP;
        x0 = _mm256_xor_si256(fold(x0, by1024), LOAD(p));
        x1 = _mm256_xor_si256(fold(x1, by1024), LOAD(p + 32));
        x2 = _mm256_xor_si256(fold(x2, by1024), LOAD(p + 64));
        x3 = _mm256_xor_si256(fold(x3, by1024), LOAD(p + 96));
        SCALAR_STEP_AT(s, stream);
    }
    return shift(reduce4(x0, x1, x2, x3), k->past_scalar) ^ shift((uint32_t)c0, k->past_two) ^
           shift((uint32_t)c1, k->past_one) ^ (uint32_t)c2;
}

uint32_t crc32c_avx2_vpclmul(uint32_t state, const uint8_t *p, size_t n) {
    for (; n >= BIG_STEPS * STEP; p += BIG_STEPS * STEP, n -= BIG_STEPS * STEP) state = block(state, p, BIG_STEPS, &big_k);
    for (; n >= SMALL_STEPS * STEP; p += SMALL_STEPS * STEP, n -= SMALL_STEPS * STEP)
        state = block(state, p, SMALL_STEPS, &small_k);
    return crc32c_sse42(state, p, n);
}

/* The folding copy (crc32c_impl.h): vector folding only, 128 bytes a step, each step's four loads also
 * stored to the row's destination, with streaming stores where it is 32-byte aligned (neither the checked
 * scatter's blocks nor the gather's pages are read again soon; the caller fences). Measured on Zen 3, 256 MiB
 * of 512-byte rows: about the CPU time of the unchecked scatter, where checking each 1 MiB chunk and then moving
 * it cost a third more: the folds run while the loads and stores wait on memory. Each step also prefetches the
 * same 128 bytes of the next row (for a call's last row, `after`, the caller's next): a gather's rows are
 * scattered, and the hardware prefetcher does not cross into the next row's page (one thread, 256 MiB of 4 KiB
 * rows in shuffled order: 0.46 of a memory copy without it, 0.62 with; in order 0.86 and 0.92-0.99; the checked
 * scatter above 0.64 and 0.67). */
void crc32c_avx2_fold_rows(crc32c_fold *f, const uint8_t *const *src, uint8_t *const *dst, size_t rows,
                           size_t row_bytes, const uint8_t *after) {
    __m256i *lanes = (__m256i *)f->lanes;
    __m256i x0 = lanes[0], x1 = lanes[1], x2 = lanes[2], x3 = lanes[3];
    for (size_t r = 0; r < rows; r++) {
        /* the last row prefetches the caller's next one (else itself, already loading: no branch in the loop) */
        const uint8_t *p = src[r], *next = r + 1 < rows ? src[r + 1] : after ? after : p;
        uint8_t *d = dst[r];
        int stream = ((uintptr_t)d & 31) == 0;
        for (size_t o = 0; o < row_bytes; o += VECTOR_STEP) {
            _mm_prefetch((const char *)next + o, _MM_HINT_T0);
            _mm_prefetch((const char *)next + o + 64, _MM_HINT_T0);
            __m256i a = LOAD(p + o), b = LOAD(p + o + 32), c = LOAD(p + o + 64), e = LOAD(p + o + 96);
            if (stream) {
                _mm256_stream_si256((__m256i *)(d + o), a);
                _mm256_stream_si256((__m256i *)(d + o + 32), b);
                _mm256_stream_si256((__m256i *)(d + o + 64), c);
                _mm256_stream_si256((__m256i *)(d + o + 96), e);
            } else {
                _mm256_storeu_si256((__m256i *)(d + o), a);
                _mm256_storeu_si256((__m256i *)(d + o + 32), b);
                _mm256_storeu_si256((__m256i *)(d + o + 64), c);
                _mm256_storeu_si256((__m256i *)(d + o + 96), e);
            }
            if (!f->started) { /* the first step takes the incoming state, as block() does */
                x0 = _mm256_xor_si256(a, _mm256_setr_epi32((int)f->raw, 0, 0, 0, 0, 0, 0, 0)), x1 = b, x2 = c, x3 = e;
                f->started = 1;
                continue;
            }
            x0 = _mm256_xor_si256(fold(x0, by1024), a);
            x1 = _mm256_xor_si256(fold(x1, by1024), b);
            x2 = _mm256_xor_si256(fold(x2, by1024), c);
            x3 = _mm256_xor_si256(fold(x3, by1024), e);
        }
    }
    lanes[0] = x0, lanes[1] = x1, lanes[2] = x2, lanes[3] = x3;
}

uint32_t crc32c_avx2_fold_end(const crc32c_fold *f) {
    const __m256i *lanes = (const __m256i *)f->lanes;
    return reduce4(lanes[0], lanes[1], lanes[2], lanes[3]);
}
