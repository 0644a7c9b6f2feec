/* File writing shared inside libthaw (io.c's, used by pages.c's gather into a file). */
#ifndef THAW_IO_IMPL_H
#define THAW_IO_IMPL_H

#include <stdint.h>
#include <sys/uio.h>

/* pwritev iov[0, n) at offset, going on after a short write until all of it is written; 0 or an errno (EIO for
 * a write that took nothing). May change iov. */
int pwritev_all(int fd, struct iovec *iov, int n, uint64_t offset);

#endif
