/* CRC32C with the SSE4.2 crc32 instruction. The instruction has a latency of three cycles and a throughput
 * of one, so three independent streams keep it busy; their states are joined with one carry-less multiply
 * each. Built with -msse4.2 -mpclmul. */
#include "crc32c_x86.h"

enum { LONG_BLOCK = 8192, SHORT_BLOCK = 256 };

/* Multipliers that move a state past one and past two blocks of each size. */
static uint32_t long_by1, long_by2, short_by1, short_by2;

void crc32c_sse42_init(void) {
    long_by1 = SHIFT_K(LONG_BLOCK);
    long_by2 = SHIFT_K(2 * LONG_BLOCK);
    short_by1 = SHIFT_K(SHORT_BLOCK);
    short_by2 = SHIFT_K(2 * SHORT_BLOCK);
}

static const uint8_t *three_streams(uint32_t *state, const uint8_t *p, size_t *n, size_t block, uint32_t by1,
                                    uint32_t by2) {
    while (*n >= 3 * block) {
        uint64_t c0 = *state, c1 = 0, c2 = 0;
        const uint8_t *end = p + block;
        do {
            c0 = _mm_crc32_u64(c0, load64(p));
            c1 = _mm_crc32_u64(c1, load64(p + block));
            c2 = _mm_crc32_u64(c2, load64(p + 2 * block));
            p += 8;
        } while (p < end);
        *state = shift((uint32_t)c0, by2) ^ shift((uint32_t)c1, by1) ^ (uint32_t)c2;
        p += 2 * block;
        *n -= 3 * block;
    }
    return p;
}

uint32_t crc32c_sse42(uint32_t state, const uint8_t *p, size_t n) {
    for (; n && ((uintptr_t)p & 7); n--) state = _mm_crc32_u8(state, *p++);
    p = three_streams(&state, p, &n, LONG_BLOCK, long_by1, long_by2);
    p = three_streams(&state, p, &n, SHORT_BLOCK, short_by1, short_by2);
    uint64_t s = state;
    for (; n >= 8; n -= 8, p += 8) s = _mm_crc32_u64(s, load64(p));
    state = (uint32_t)s;
    for (; n; n--) state = _mm_crc32_u8(state, *p++);
    return state;
}
