/* libthaw's CUDA mover: a separate shared object (libthaw_cuda.so, cudart linked statically), opened with
 * dlopen only where a GPU is present, so the CPU package never links libcudart.
 *
 * Every function returns 0 on success, THAW_CUDA_BAD_CHUNK after a checksum mismatch (bad_region and
 * bad_chunk say where), or THAW_CUDA_ERROR (thaw_cuda_last_error() says why). Streams are cudaStream_t
 * passed as void *, NULL for the default stream. */
#ifndef THAW_CUDA_H
#define THAW_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "thaw.h" /* thaw_region, thaw_io_status: the CPU library's types, for the host routines below */

/* The library is built with hidden visibility; only these functions are exported. */
#define THAW_CUDA_API __attribute__((visibility("default")))

#define THAW_CUDA_OK 0
#define THAW_CUDA_BAD_CHUNK 1
#define THAW_CUDA_ERROR 2

/* A byte range of a file and the device memory it comes from (writes) or goes to (reads). */
typedef struct {
    uint64_t offset;
    void *device;
    uint64_t len;
    uint64_t chunk_size;
    uint32_t *crcs; /* ceil(len / chunk_size): filled by writes, expected by reads */
} thaw_cuda_region;

/* libthaw's parallel host routines (thaw.h), handed over by address once (libthaw_cuda.so is opened apart from
 * the CPU library), before any ring call: the ring's host side runs on libthaw's thread pool (copies into and
 * out of the pinned slots with their per-chunk checksums, checksums of pinned host memory in place, the file's
 * reads and writes). A ring call made before they are set fails with THAW_CUDA_ERROR. */
typedef struct {
    void (*chunk_crcs)(const void *data, size_t len, size_t chunk_size, uint32_t *out);
    void (*copy_chunk_crcs)(void *dst, const void *src, size_t len, size_t chunk_size, uint32_t *out);
    int (*read_regions)(int fd, const thaw_region *regions, size_t n, int flags, thaw_io_status *status);
    int (*write_regions)(int fd, const thaw_region *regions, size_t n, thaw_io_status *status);
} thaw_cuda_host_ops;

THAW_CUDA_API void thaw_cuda_set_host_ops(const thaw_cuda_host_ops *ops);
THAW_CUDA_API int thaw_cuda_device_count(void);
THAW_CUDA_API const char *thaw_cuda_last_error(void);

/* Copy n slabs of `length` bytes from device_src + offsets[i] (offsets in host memory) into host_out
 * (n * length bytes): a kernel gathers them into one device buffer, then one device-to-host copy (one slab:
 * just the copy). */
THAW_CUDA_API int thaw_cuda_gather_to_host(const void *device_src, const int64_t *offsets, size_t n, size_t length,
                             void *host_out, void *stream);
/* The reverse: one host-to-device copy of host_src (n * length bytes), then a kernel scatters the slabs to
 * device_out + offsets[i]. */
THAW_CUDA_API int thaw_cuda_scatter_from_host(const void *host_src, void *device_out, const int64_t *offsets, size_t n,
                                size_t length, void *stream);

/* The ring's pinned slots are allocated on first use and kept for later calls (grown when a call needs more);
 * calls that use the ring run one at a time.
 * Device memory to file through a ring of `slots` pinned buffers of slot_bytes: the device-to-host copy
 * of one piece overlaps the checksum and pwrite of the previous one. The pieces and their slots are
 * thaw_stage_plan's (thaw_stage.h). */
THAW_CUDA_API int thaw_cuda_write_regions(int fd, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots,
                            void *stream);
/* File to device memory through the pinned ring: each piece is read into a slot and checked there, and only
 * then copied to the device, while the next piece is read. Device memory never receives a bad chunk. */
THAW_CUDA_API int thaw_cuda_read_regions(int fd, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots,
                           void *stream, int64_t *bad_region, int64_t *bad_chunk);

/* The same two with host memory in place of the file: region offsets are offsets into `host`, which need
 * not be pinned (the ring's slots are). Where every region lies in memory the driver has pinned
 * (cudaMallocHost, or thaw_cuda_register_host), no slot is used: each piece is checked in place and copied
 * straight from it (reads), or copied straight into it and then checksummed there (writes). The checked bytes
 * are then the caller's, not a private copy: they must not change until the call returns. */
THAW_CUDA_API int thaw_cuda_write_host(void *host, const thaw_cuda_region *regions, size_t n, size_t slot_bytes,
                                       int slots, void *stream);
THAW_CUDA_API int thaw_cuda_read_host(const void *host, const thaw_cuda_region *regions, size_t n, size_t slot_bytes,
                                      int slots, void *stream, int64_t *bad_region, int64_t *bad_chunk);

/* Pin (cudaHostRegister) or unpin len bytes of host memory for the ring's direct copies above. Pinning every
 * page costs about three copies of the bytes (an H200's host: 17 GB/s for both calls), so it
 * pays for bytes that move to or from the GPU several times, such as a snapshot restored into many engines. */
THAW_CUDA_API int thaw_cuda_register_host(void *host, size_t len);
THAW_CUDA_API int thaw_cuda_unregister_host(void *host);

#ifdef __cplusplus
}
#endif

#endif
