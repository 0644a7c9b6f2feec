/* Portable CRC32C: slicing-by-8, eight table lookups per 8 bytes. */
#include <string.h>

#include "crc32c_impl.h"

static uint32_t table[8][256];

void crc32c_sw_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (CRC32C_POLY & (0u - (c & 1)));
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
}

static uint64_t load_le64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

uint32_t crc32c_sw(uint32_t state, const uint8_t *p, size_t n) {
    for (; n && ((uintptr_t)p & 7); n--) state = (state >> 8) ^ table[0][(state ^ *p++) & 0xff];
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t v = load_le64(p) ^ state;
        state = table[7][v & 0xff] ^ table[6][(v >> 8) & 0xff] ^ table[5][(v >> 16) & 0xff] ^
                table[4][(v >> 24) & 0xff] ^ table[3][(v >> 32) & 0xff] ^ table[2][(v >> 40) & 0xff] ^
                table[1][(v >> 48) & 0xff] ^ table[0][v >> 56];
    }
    for (; n; n--) state = (state >> 8) ^ table[0][(state ^ *p++) & 0xff];
    return state;
}
