// libthaw's CUDA mover; see thaw_cuda.h. One host thread drives a ring of pinned buffers, each with an
// event marking when the DMA that uses it has finished, so file I/O and checksums overlap the copies.
#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "thaw_cuda.h"

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

struct slot {
    uint8_t *host = nullptr;
    cudaEvent_t done = nullptr;  // recorded after the copy that uses this slot
    size_t region = 0;
    uint64_t start = 0, len = 0;
};

struct ring {
    slot slots[8];
    int count = 0;
    ~ring() {
        for (int i = 0; i < count; i++) {
            cudaFreeHost(slots[i].host);
            cudaEventDestroy(slots[i].done);
        }
    }
};

static int make_ring(ring &r, int slots, size_t slot_bytes) {
    if (slots < 2) slots = 2;
    if (slots > 8) slots = 8;
    for (; r.count < slots; r.count++) {
        CHECK(cudaMallocHost(&r.slots[r.count].host, slot_bytes));
        CHECK(cudaEventCreateWithFlags(&r.slots[r.count].done, cudaEventDisableTiming));
    }
    return THAW_CUDA_OK;
}

// Whole chunks of one region that fit a slot: the step between piece starts.
static uint64_t piece_step(const thaw_cuda_region *r, size_t slot_bytes) {
    return r->chunk_size >= slot_bytes ? r->chunk_size : slot_bytes / r->chunk_size * r->chunk_size;
}

static size_t widest_step(const thaw_cuda_region *regions, size_t n, size_t slot_bytes) {
    size_t widest = slot_bytes;
    for (size_t i = 0; i < n; i++)
        if (piece_step(&regions[i], slot_bytes) > widest) widest = piece_step(&regions[i], slot_bytes);
    return widest;
}

static int pwrite_all(int fd, const uint8_t *p, uint64_t n, uint64_t offset) {
    while (n) {
        ssize_t w = pwrite(fd, p, n, (off_t)offset);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return fail("pwrite", cudaSuccess);
        p += w, n -= (uint64_t)w, offset += (uint64_t)w;
    }
    return THAW_CUDA_OK;
}

static int pread_all(int fd, uint8_t *p, uint64_t n, uint64_t offset) {
    while (n) {
        ssize_t got = pread(fd, p, n, (off_t)offset);
        if (got < 0 && errno == EINTR) continue;
        if (got == 0) errno = ENODATA;
        if (got <= 0) return fail("pread", cudaSuccess);
        p += got, n -= (uint64_t)got, offset += (uint64_t)got;
    }
    return THAW_CUDA_OK;
}

// Checksum and write out a slot whose device-to-host copy was issued earlier.
static int drain(int fd, slot &s, const thaw_cuda_region *regions, thaw_crc_fn crc) {
    if (s.len == 0) return THAW_CUDA_OK;
    CHECK(cudaEventSynchronize(s.done));
    const thaw_cuda_region *r = &regions[s.region];
    for (uint64_t c = 0; c * r->chunk_size < s.len; c++) {
        uint64_t n = s.len - c * r->chunk_size < r->chunk_size ? s.len - c * r->chunk_size : r->chunk_size;
        r->crcs[s.start / r->chunk_size + c] = crc(0, s.host + c * r->chunk_size, n);
    }
    int err = pwrite_all(fd, s.host, s.len, r->offset + s.start);
    s.len = 0;
    return err;
}

extern "C" int thaw_cuda_write_regions(int fd, const thaw_cuda_region *regions, size_t n, size_t slot_bytes,
                                       int slots, thaw_crc_fn crc, void *stream_ptr) {
    cudaStream_t stream = (cudaStream_t)stream_ptr;
    ring ring_;
    if (make_ring(ring_, slots, widest_step(regions, n, slot_bytes))) return THAW_CUDA_ERROR;
    int next = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t step = piece_step(&regions[i], slot_bytes);
        for (uint64_t start = 0; start < regions[i].len; start += step) {
            slot &s = ring_.slots[next];
            if (drain(fd, s, regions, crc)) return THAW_CUDA_ERROR;  // the slot's previous piece goes out first
            s.region = i, s.start = start;
            s.len = regions[i].len - start < step ? regions[i].len - start : step;
            CHECK(cudaMemcpyAsync(s.host, (const uint8_t *)regions[i].device + start, s.len, cudaMemcpyDeviceToHost, stream));
            CHECK(cudaEventRecord(s.done, stream));
            next = (next + 1) % ring_.count;
        }
    }
    for (int k = 0; k < ring_.count; k++)  // oldest first, so the file is written in order
        if (drain(fd, ring_.slots[(next + k) % ring_.count], regions, crc)) return THAW_CUDA_ERROR;
    return THAW_CUDA_OK;
}

extern "C" int thaw_cuda_read_regions(int fd, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots,
                                      thaw_crc_fn crc, void *stream_ptr, int64_t *bad_region, int64_t *bad_chunk) {
    cudaStream_t stream = (cudaStream_t)stream_ptr;
    ring ring_;
    if (make_ring(ring_, slots, widest_step(regions, n, slot_bytes))) return THAW_CUDA_ERROR;
    int next = 0;
    for (size_t i = 0; i < n; i++) {
        const thaw_cuda_region *r = &regions[i];
        uint64_t step = piece_step(r, slot_bytes);
        for (uint64_t start = 0; start < r->len; start += step) {
            slot &s = ring_.slots[next];
            CHECK(cudaEventSynchronize(s.done));  // its previous host-to-device copy has finished
            uint64_t len = r->len - start < step ? r->len - start : step;
            if (pread_all(fd, s.host, len, r->offset + start)) return THAW_CUDA_ERROR;
            for (uint64_t c = 0; c * r->chunk_size < len; c++) {
                uint64_t cn = len - c * r->chunk_size < r->chunk_size ? len - c * r->chunk_size : r->chunk_size;
                if (crc(0, s.host + c * r->chunk_size, cn) != r->crcs[start / r->chunk_size + c]) {
                    *bad_region = (int64_t)i;
                    *bad_chunk = (int64_t)(start / r->chunk_size + c);
                    CHECK(cudaStreamSynchronize(stream));
                    return THAW_CUDA_BAD_CHUNK;
                }
            }
            CHECK(cudaMemcpyAsync((uint8_t *)r->device + start, s.host, len, cudaMemcpyHostToDevice, stream));
            CHECK(cudaEventRecord(s.done, stream));
            next = (next + 1) % ring_.count;
        }
    }
    CHECK(cudaStreamSynchronize(stream));
    return THAW_CUDA_OK;
}
