/* Every CRC32C kernel of this build against the software one, for builds pytest cannot load (a cross-compiled
 * one under qemu-user): sizes 0..1099 at every alignment below 64, then random sizes up to 256 KiB. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "thaw.h"

int main(void) {
    printf("available %s, active %s\n", thaw_crc32c_available(), thaw_crc32c_impl());
    if (thaw_crc32c(0, "123456789", 9) != 0xE3069283u) return printf("known answer wrong\n"), 1;
    const size_t max = 256 << 10;
    unsigned char *buf = malloc(max + 64);
    srand(1);
    for (size_t i = 0; i < max + 64; i++) buf[i] = (unsigned char)rand();
    char names[128];
    int bad = 0;
    for (int t = 0; t < 1500; t++) {
        size_t align = (size_t)t % 64, len = t < 1100 ? (size_t)t : (size_t)rand() % max;
        thaw_crc32c_select("software");
        uint32_t expected = thaw_crc32c((uint32_t)t, buf + align, len);
        strcpy(names, thaw_crc32c_available());
        for (char *name = strtok(names, ","); name; name = strtok(NULL, ",")) {
            thaw_crc32c_select(name);
            bad += thaw_crc32c((uint32_t)t, buf + align, len) != expected;
        }
    }
    printf("bad %d\n", bad);
    return bad != 0;
}
