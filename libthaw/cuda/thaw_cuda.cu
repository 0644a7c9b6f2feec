// libthaw's CUDA mover; see thaw_cuda.h. One host thread drives a ring of pinned buffers, each with an
// event marking when the DMA that uses it has finished, so file I/O and checksums overlap the copies.
#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "thaw_cuda.h"
#include "thaw_stage.h"

static __thread char last_error[256];

static int fail(const char *what, cudaError_t err) {
    snprintf(last_error, sizeof last_error, "%s: %s", what, err == cudaSuccess ? strerror(errno) : cudaGetErrorString(err));
    return THAW_CUDA_ERROR;
}

#define CHECK(call)                                         \
    do {                                                    \
        cudaError_t err_ = (call);                          \
        if (err_ != cudaSuccess) return fail(#call, err_); \
    } while (0)

extern "C" const char *thaw_cuda_last_error(void) { return last_error; }

extern "C" int thaw_cuda_device_count(void) {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

// ---- gather / scatter on the device ----

// One block per slab; threads stride over its bytes in 16-byte words where source and destination allow.
__global__ void move_slabs(const uint8_t *src, uint8_t *dst, const int64_t *offsets, size_t length, int gather) {
    const int64_t slab = blockIdx.x;
    const uint8_t *from = gather ? src + offsets[slab] : src + slab * length;
    uint8_t *to = gather ? dst + slab * length : dst + offsets[slab];
    if ((((uintptr_t)from | (uintptr_t)to | length) & 15) == 0) {
        const uint4 *f = (const uint4 *)from;
        uint4 *t = (uint4 *)to;
        for (size_t i = threadIdx.x; i < length / 16; i += blockDim.x) t[i] = f[i];
    } else {
        for (size_t i = threadIdx.x; i < length; i += blockDim.x) to[i] = from[i];
    }
}

// Device scratch for one gather or scatter: the slab offsets and the contiguous staging run.
struct scratch {
    int64_t *offsets = nullptr;
    uint8_t *run = nullptr;
    ~scratch() {
        cudaFree(offsets);
        cudaFree(run);
    }
};

static int stage_offsets(scratch &s, const int64_t *offsets, size_t n, size_t length, cudaStream_t stream) {
    CHECK(cudaMalloc(&s.offsets, n * sizeof(int64_t)));
    CHECK(cudaMalloc(&s.run, n * length));
    CHECK(cudaMemcpyAsync(s.offsets, offsets, n * sizeof(int64_t), cudaMemcpyHostToDevice, stream));
    return THAW_CUDA_OK;
}

extern "C" int thaw_cuda_gather_to_host(const void *device_src, const int64_t *offsets, size_t n, size_t length,
                                        void *host_out, void *stream_ptr) {
    if (n == 0 || length == 0) return THAW_CUDA_OK;
    cudaStream_t stream = (cudaStream_t)stream_ptr;
    scratch s;
    if (stage_offsets(s, offsets, n, length, stream)) return THAW_CUDA_ERROR;
    move_slabs<<<(unsigned)n, 256, 0, stream>>>((const uint8_t *)device_src, s.run, s.offsets, length, 1);
    CHECK(cudaGetLastError());
    CHECK(cudaMemcpyAsync(host_out, s.run, n * length, cudaMemcpyDeviceToHost, stream));
    CHECK(cudaStreamSynchronize(stream));
    return THAW_CUDA_OK;
}

extern "C" int thaw_cuda_scatter_from_host(const void *host_src, void *device_out, const int64_t *offsets, size_t n,
                                           size_t length, void *stream_ptr) {
    if (n == 0 || length == 0) return THAW_CUDA_OK;
    cudaStream_t stream = (cudaStream_t)stream_ptr;
    scratch s;
    if (stage_offsets(s, offsets, n, length, stream)) return THAW_CUDA_ERROR;
    CHECK(cudaMemcpyAsync(s.run, host_src, n * length, cudaMemcpyHostToDevice, stream));
    move_slabs<<<(unsigned)n, 256, 0, stream>>>(s.run, (uint8_t *)device_out, s.offsets, length, 0);
    CHECK(cudaGetLastError());
    CHECK(cudaStreamSynchronize(stream));
    return THAW_CUDA_OK;
}

// ---- the pinned ring ----

// Where a ring's bytes come from (reads) or go to (writes): a file descriptor, or host memory when `host` is
// set (region offsets are then offsets into it).
struct endpoint {
    int fd;
    uint8_t *host;
};

struct slot {
    uint8_t *host = nullptr;
    cudaEvent_t done = nullptr;  // recorded after the copy that uses this slot
    const thaw_stage_piece *piece = nullptr;  // the piece whose device-to-host copy is pending (writes)
};

// The pinned slots and the plan they execute (thaw_stage.h).
struct ring {
    slot slots[8];
    int count = 0;
    thaw_stage_piece *plan = nullptr;
    int64_t pieces = 0;
    ~ring() {
        for (int i = 0; i < count; i++) {
            cudaFreeHost(slots[i].host);
            cudaEventDestroy(slots[i].done);
        }
        delete[] plan;
    }
};

static int make_ring(ring &r, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots) {
    uint64_t *lens = new uint64_t[n ? 2 * n : 1], *chunks = lens + n;
    for (size_t i = 0; i < n; i++) lens[i] = regions[i].len, chunks[i] = regions[i].chunk_size;
    uint64_t bytes = thaw_stage_slot_bytes(lens, chunks, n, slot_bytes);
    r.pieces = thaw_stage_plan(lens, chunks, n, slot_bytes, slots, nullptr, 0);
    if (r.pieces >= 0) {
        r.plan = new thaw_stage_piece[r.pieces ? r.pieces : 1];
        thaw_stage_plan(lens, chunks, n, slot_bytes, slots, r.plan, (size_t)r.pieces);
    }
    delete[] lens;
    if (r.pieces < 0) {
        snprintf(last_error, sizeof last_error, "a region has chunk size 0, or slot_bytes is 0");
        return THAW_CUDA_ERROR;
    }
    for (int want = thaw_stage_slots(slots); r.count < want; r.count++) {
        CHECK(cudaMallocHost(&r.slots[r.count].host, bytes));
        CHECK(cudaEventCreateWithFlags(&r.slots[r.count].done, cudaEventDisableTiming));
    }
    return THAW_CUDA_OK;
}

static int put(endpoint to, const uint8_t *p, uint64_t n, uint64_t offset) {
    if (to.host) return memcpy(to.host + offset, p, n), THAW_CUDA_OK;
    while (n) {
        ssize_t w = pwrite(to.fd, p, n, (off_t)offset);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return fail("pwrite", cudaSuccess);
        p += w, n -= (uint64_t)w, offset += (uint64_t)w;
    }
    return THAW_CUDA_OK;
}

static int get(endpoint from, uint8_t *p, uint64_t n, uint64_t offset) {
    if (from.host) return memcpy(p, from.host + offset, n), THAW_CUDA_OK;
    while (n) {
        ssize_t got = pread(from.fd, p, n, (off_t)offset);
        if (got < 0 && errno == EINTR) continue;
        if (got == 0) errno = ENODATA;
        if (got <= 0) return fail("pread", cudaSuccess);
        p += got, n -= (uint64_t)got, offset += (uint64_t)got;
    }
    return THAW_CUDA_OK;
}

// Checksum and write out a slot whose device-to-host copy was issued earlier.
static int drain(endpoint to, slot &s, const thaw_cuda_region *regions, thaw_crc_fn crc) {
    if (!s.piece) return THAW_CUDA_OK;
    CHECK(cudaEventSynchronize(s.done));
    const thaw_stage_piece *p = s.piece;
    const thaw_cuda_region *r = &regions[p->region];
    for (uint64_t c = 0; c * r->chunk_size < p->len; c++) {
        uint64_t n = p->len - c * r->chunk_size < r->chunk_size ? p->len - c * r->chunk_size : r->chunk_size;
        r->crcs[p->start / r->chunk_size + c] = crc(0, s.host + c * r->chunk_size, n);
    }
    s.piece = nullptr;
    return put(to, s.host, p->len, r->offset + p->start);
}

static int write_ring(endpoint to, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots,
                      thaw_crc_fn crc, cudaStream_t stream) {
    ring ring_;
    if (make_ring(ring_, regions, n, slot_bytes, slots)) return THAW_CUDA_ERROR;
    for (int64_t k = 0; k < ring_.pieces; k++) {
        const thaw_stage_piece *p = &ring_.plan[k];
        slot &s = ring_.slots[p->slot];
        if (drain(to, s, regions, crc)) return THAW_CUDA_ERROR;  // the slot's previous piece goes out first
        CHECK(cudaMemcpyAsync(s.host, (const uint8_t *)regions[p->region].device + p->start, p->len,
                              cudaMemcpyDeviceToHost, stream));
        CHECK(cudaEventRecord(s.done, stream));
        s.piece = p;
    }
    for (int64_t k = ring_.pieces - ring_.count; k < ring_.pieces; k++)  // oldest first, so output is in order
        if (k >= 0 && drain(to, ring_.slots[ring_.plan[k].slot], regions, crc)) return THAW_CUDA_ERROR;
    return THAW_CUDA_OK;
}

static int read_ring(endpoint from, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots,
                     thaw_crc_fn crc, cudaStream_t stream, int64_t *bad_region, int64_t *bad_chunk) {
    ring ring_;
    if (make_ring(ring_, regions, n, slot_bytes, slots)) return THAW_CUDA_ERROR;
    for (int64_t k = 0; k < ring_.pieces; k++) {
        const thaw_stage_piece *p = &ring_.plan[k];
        const thaw_cuda_region *r = &regions[p->region];
        slot &s = ring_.slots[p->slot];
        CHECK(cudaEventSynchronize(s.done));  // its previous host-to-device copy has finished
        if (get(from, s.host, p->len, r->offset + p->start)) return THAW_CUDA_ERROR;
        for (uint64_t c = 0; c * r->chunk_size < p->len; c++) {
            uint64_t cn = p->len - c * r->chunk_size < r->chunk_size ? p->len - c * r->chunk_size : r->chunk_size;
            if (crc(0, s.host + c * r->chunk_size, cn) != r->crcs[p->start / r->chunk_size + c]) {
                *bad_region = (int64_t)p->region;
                *bad_chunk = (int64_t)(p->start / r->chunk_size + c);
                CHECK(cudaStreamSynchronize(stream));
                return THAW_CUDA_BAD_CHUNK;
            }
        }
        CHECK(cudaMemcpyAsync((uint8_t *)r->device + p->start, s.host, p->len, cudaMemcpyHostToDevice, stream));
        CHECK(cudaEventRecord(s.done, stream));
    }
    CHECK(cudaStreamSynchronize(stream));
    return THAW_CUDA_OK;
}

extern "C" int thaw_cuda_write_regions(int fd, const thaw_cuda_region *regions, size_t n, size_t slot_bytes,
                                       int slots, thaw_crc_fn crc, void *stream) {
    return write_ring(endpoint{fd, nullptr}, regions, n, slot_bytes, slots, crc, (cudaStream_t)stream);
}

extern "C" int thaw_cuda_write_host(void *host, const thaw_cuda_region *regions, size_t n, size_t slot_bytes,
                                    int slots, thaw_crc_fn crc, void *stream) {
    return write_ring(endpoint{-1, (uint8_t *)host}, regions, n, slot_bytes, slots, crc, (cudaStream_t)stream);
}

extern "C" int thaw_cuda_read_regions(int fd, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots,
                                      thaw_crc_fn crc, void *stream, int64_t *bad_region, int64_t *bad_chunk) {
    return read_ring(endpoint{fd, nullptr}, regions, n, slot_bytes, slots, crc, (cudaStream_t)stream, bad_region,
                     bad_chunk);
}

extern "C" int thaw_cuda_read_host(const void *host, const thaw_cuda_region *regions, size_t n, size_t slot_bytes,
                                   int slots, thaw_crc_fn crc, void *stream, int64_t *bad_region, int64_t *bad_chunk) {
    return read_ring(endpoint{-1, (uint8_t *)host}, regions, n, slot_bytes, slots, crc, (cudaStream_t)stream,
                     bad_region, bad_chunk);
}
