/* Whether this ARMv8 CPU has the CRC32 instructions (Linux auxv; always present on Apple silicon). */
#include "crc32c_impl.h"

#if defined(__APPLE__)
int cpu_arm64_has_crc(void) { return 1; }
#else
#include <asm/hwcap.h>
#include <sys/auxv.h>
int cpu_arm64_has_crc(void) { return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0; }
#endif
