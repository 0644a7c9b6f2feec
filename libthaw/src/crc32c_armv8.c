/* CRC32C with the ARMv8 CRC32 extension (crc32cx on 8 bytes at a time). Built with -march=armv8-a+crc. */
#include <arm_acle.h>
#include <string.h>

#include "crc32c_impl.h"

uint32_t crc32c_armv8(uint32_t state, const uint8_t *p, size_t n) {
    for (; n && ((uintptr_t)p & 7); n--) state = __crc32cb(state, *p++);
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        state = __crc32cd(state, v);
    }
    for (; n; n--) state = __crc32cb(state, *p++);
    return state;
}
