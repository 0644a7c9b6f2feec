// libthaw's CUDA mover; see thaw_cuda.h. One host thread drives a ring of pinned buffers, each with an
// event marking when the DMA that uses it has finished, so file I/O and checksums overlap the copies.
#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <mutex>
#include <vector>

#include "thaw_cuda.h"
#include "thaw_stage.h"

static __thread char last_error[256];

static int fail(const char *what, cudaError_t err) {
    snprintf(last_error, sizeof last_error, "%s: %s", what, err == cudaSuccess ? strerror(errno) : cudaGetErrorString(err));
    if (err != cudaSuccess) cudaGetLastError();  // reported here: a later call's launch check must not see it again
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
    if (n == 1) {  // one slab: one copy, no kernel and no scratch (allocating and freeing it synchronises)
        CHECK(cudaMemcpyAsync(host_out, (const uint8_t *)device_src + offsets[0], length, cudaMemcpyDeviceToHost,
                              stream));
        CHECK(cudaStreamSynchronize(stream));
        return THAW_CUDA_OK;
    }
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
    if (n == 1) {  // as in gather_to_host
        CHECK(cudaMemcpyAsync((uint8_t *)device_out + offsets[0], host_src, length, cudaMemcpyHostToDevice, stream));
        CHECK(cudaStreamSynchronize(stream));
        return THAW_CUDA_OK;
    }
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
// set (region offsets are then offsets into it). Host memory the driver already has pinned (cudaMallocHost, or
// registered: thaw_cuda_register_host) is `direct`: the DMA uses it in place and its chunks are checksummed
// there, with no copy through a slot (restore measured 0.91 of a pinned copy on an H200, the staged ring 0.65 in the same run).
struct endpoint {
    int fd;
    uint8_t *host;
    bool direct;
};

static bool pinned_byte(const void *p) {
    cudaPointerAttributes a;
    return cudaPointerGetAttributes(&a, p) == cudaSuccess && a.type == cudaMemoryTypeHost;
}

// Host memory whose every region starts and ends in pinned memory. A region whose two ends lie in two different
// registrations also counts: its copies are then the driver's to make or refuse (not tested on a GPU).
static endpoint host_endpoint(const void *host, const thaw_cuda_region *regions, size_t n) {
    endpoint e = {-1, (uint8_t *)host, n > 0};
    for (size_t i = 0; i < n && e.direct; i++)
        if (regions[i].len)
            e.direct = pinned_byte(e.host + regions[i].offset) &&
                       pinned_byte(e.host + regions[i].offset + regions[i].len - 1);
    cudaGetLastError();  // a refused lookup is an answer here, not an error for the next call to see
    return e;
}

struct slot {
    uint8_t *host = nullptr;
    cudaEvent_t done = nullptr;  // recorded after the copy that uses this slot
    const thaw_stage_piece *piece = nullptr;  // the piece whose device-to-host copy is pending (writes)
};

// The pinned slots, kept from call to call: pinning memory costs far more than a piece's copy, so they are
// allocated once (and again only larger). ring_lock makes the calls that use them run one at a time.
static std::mutex ring_lock;
static slot slots_[8];
static int slot_count = 0;
static uint64_t slot_size = 0;

static thaw_cuda_host_ops host_ops;  // all null until thaw_cuda_set_host_ops; the ring refuses to run before it

extern "C" void thaw_cuda_set_host_ops(const thaw_cuda_host_ops *ops) {
    std::lock_guard<std::mutex> hold(ring_lock);
    host_ops = *ops;
}

// Waits, whatever way the call ends, for the copies it queued: on an error return too, they may still be
// reading or writing the caller's pinned memory, which the caller may unpin or free next.
struct settled {
    cudaStream_t stream;
    ~settled() { cudaStreamSynchronize(stream); }
};

// The plan (thaw_stage.h) for one call, over the kept slots.
struct ring {
    int count = 0;
    thaw_stage_piece *plan = nullptr;
    int64_t pieces = 0;
    ~ring() { delete[] plan; }
};

static int make_ring(ring &r, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots) {
    if (!host_ops.chunk_crcs || !host_ops.copy_chunk_crcs || !host_ops.read_regions || !host_ops.write_regions) {
        snprintf(last_error, sizeof last_error, "thaw_cuda_set_host_ops was not called with all four routines");
        return THAW_CUDA_ERROR;
    }
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
    r.count = thaw_stage_slots(slots);
    for (int i = 0; i < slot_count; i++) {  // a failed call may have left a copy in flight into a slot
        CHECK(cudaEventSynchronize(slots_[i].done));
        slots_[i].piece = nullptr;
    }
    if (bytes > slot_size) {  // too small for this call: all of them are pinned again at its size
        for (; slot_count > 0; slot_count--) {
            CHECK(cudaFreeHost(slots_[slot_count - 1].host));
            slots_[slot_count - 1].host = nullptr;
        }
        slot_size = bytes;
    }
    for (; slot_count < r.count; slot_count++) {
        CHECK(cudaMallocHost(&slots_[slot_count].host, slot_size));
        if (!slots_[slot_count].done) CHECK(cudaEventCreateWithFlags(&slots_[slot_count].done, cudaEventDisableTiming));
    }
    return THAW_CUDA_OK;
}

static int io_failed(const char *what, const thaw_io_status &status) {
    errno = status.error == THAW_EOF ? ENODATA : status.error;
    return fail(what, cudaSuccess);
}

// Checksum and write out a slot whose device-to-host copy was issued earlier.
static int drain(endpoint to, slot &s, const thaw_cuda_region *regions) {
    if (!s.piece) return THAW_CUDA_OK;
    CHECK(cudaEventSynchronize(s.done));
    const thaw_stage_piece *p = s.piece;
    const thaw_cuda_region *r = &regions[p->region];
    uint32_t *crcs = r->crcs + p->start / r->chunk_size;
    s.piece = nullptr;
    uint8_t *host = to.host ? to.host + r->offset + p->start : nullptr;
    if (to.direct) return host_ops.chunk_crcs(host, p->len, r->chunk_size, crcs), THAW_CUDA_OK;
    if (to.host) return host_ops.copy_chunk_crcs(host, s.host, p->len, r->chunk_size, crcs), THAW_CUDA_OK;
    thaw_region out = {r->offset + p->start, s.host, p->len, r->chunk_size, crcs};  // pwrite and checksums
    thaw_io_status status = {};
    return host_ops.write_regions(to.fd, &out, 1, &status) == THAW_OK ? THAW_CUDA_OK : io_failed("write", status);
}

static int write_ring(endpoint to, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots,
                      cudaStream_t stream) {
    std::lock_guard<std::mutex> hold(ring_lock);
    settled settle{stream};
    ring ring_;
    if (make_ring(ring_, regions, n, slot_bytes, slots)) return THAW_CUDA_ERROR;
    for (int64_t k = 0; k < ring_.pieces; k++) {
        const thaw_stage_piece *p = &ring_.plan[k];
        slot &s = slots_[p->slot];
        if (drain(to, s, regions)) return THAW_CUDA_ERROR;  // the slot's previous piece goes out first
        uint8_t *into = to.direct ? to.host + regions[p->region].offset + p->start : s.host;
        CHECK(cudaMemcpyAsync(into, (const uint8_t *)regions[p->region].device + p->start, p->len,
                              cudaMemcpyDeviceToHost, stream));
        CHECK(cudaEventRecord(s.done, stream));
        s.piece = p;
    }
    for (int64_t k = ring_.pieces - ring_.count; k < ring_.pieces; k++)  // oldest first, so output is in order
        if (k >= 0 && drain(to, slots_[ring_.plan[k].slot], regions)) return THAW_CUDA_ERROR;
    return THAW_CUDA_OK;
}

// Fill a slot with piece p and check its chunks there (pinned host memory: check them in place); returns the
// first bad chunk's index in the piece, -1 when all passed, or -2 after an error (last_error says why). A
// file's piece goes through thaw_read_regions's per-thread staging buffers, not straight into the slot: the
// CRC then reads each piece from cache, measured 2x faster on a CPU host and no slower on the H200 than
// reading in place.
static int64_t fill(endpoint from, slot &s, const thaw_stage_piece *p, const thaw_cuda_region *r,
                    std::vector<uint32_t> &got) {
    const uint32_t *want = r->crcs + p->start / r->chunk_size;
    if (from.host) {
        const uint8_t *in = from.host + r->offset + p->start;
        got.resize((p->len + r->chunk_size - 1) / r->chunk_size);
        if (from.direct)
            host_ops.chunk_crcs(in, p->len, r->chunk_size, got.data());
        else
            host_ops.copy_chunk_crcs(s.host, in, p->len, r->chunk_size, got.data());
        for (size_t c = 0; c < got.size(); c++)
            if (got[c] != want[c]) return (int64_t)c;
        return -1;
    }
    thaw_region in = {r->offset + p->start, s.host, p->len, r->chunk_size, (uint32_t *)want};
    thaw_io_status status = {};
    int code = host_ops.read_regions(from.fd, &in, 1, 0, &status);
    if (code == THAW_OK) return -1;
    if (code == THAW_BAD_CHUNK) return status.bad_chunk;
    io_failed("read", status);
    return -2;
}

static int read_ring(endpoint from, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots,
                     cudaStream_t stream, int64_t *bad_region, int64_t *bad_chunk) {
    std::lock_guard<std::mutex> hold(ring_lock);
    settled settle{stream};
    ring ring_;
    if (make_ring(ring_, regions, n, slot_bytes, slots)) return THAW_CUDA_ERROR;
    std::vector<uint32_t> got;
    for (int64_t k = 0; k < ring_.pieces; k++) {
        const thaw_stage_piece *p = &ring_.plan[k];
        const thaw_cuda_region *r = &regions[p->region];
        slot &s = slots_[p->slot];
        if (!from.direct) CHECK(cudaEventSynchronize(s.done));  // its previous host-to-device copy has finished
        int64_t bad = fill(from, s, p, r, got);
        if (bad == -2) return THAW_CUDA_ERROR;
        if (bad >= 0) {
            *bad_region = (int64_t)p->region;
            *bad_chunk = (int64_t)(p->start / r->chunk_size) + bad;
            CHECK(cudaStreamSynchronize(stream));
            return THAW_CUDA_BAD_CHUNK;
        }
        const uint8_t *out = from.direct ? from.host + r->offset + p->start : s.host;
        CHECK(cudaMemcpyAsync((uint8_t *)r->device + p->start, out, p->len, cudaMemcpyHostToDevice, stream));
        if (!from.direct) CHECK(cudaEventRecord(s.done, stream));  // pinned memory in place reuses no slot
    }
    CHECK(cudaStreamSynchronize(stream));
    return THAW_CUDA_OK;
}

extern "C" int thaw_cuda_write_regions(int fd, const thaw_cuda_region *regions, size_t n, size_t slot_bytes,
                                       int slots, void *stream) {
    return write_ring(endpoint{fd, nullptr, false}, regions, n, slot_bytes, slots, (cudaStream_t)stream);
}

extern "C" int thaw_cuda_write_host(void *host, const thaw_cuda_region *regions, size_t n, size_t slot_bytes,
                                    int slots, void *stream) {
    return write_ring(host_endpoint(host, regions, n), regions, n, slot_bytes, slots, (cudaStream_t)stream);
}

extern "C" int thaw_cuda_read_regions(int fd, const thaw_cuda_region *regions, size_t n, size_t slot_bytes, int slots,
                                      void *stream, int64_t *bad_region, int64_t *bad_chunk) {
    return read_ring(endpoint{fd, nullptr, false}, regions, n, slot_bytes, slots, (cudaStream_t)stream, bad_region,
                     bad_chunk);
}

extern "C" int thaw_cuda_read_host(const void *host, const thaw_cuda_region *regions, size_t n, size_t slot_bytes,
                                   int slots, void *stream, int64_t *bad_region, int64_t *bad_chunk) {
    return read_ring(host_endpoint(host, regions, n), regions, n, slot_bytes, slots, (cudaStream_t)stream,
                     bad_region, bad_chunk);
}

extern "C" int thaw_cuda_register_host(void *host, size_t len) {
    CHECK(cudaHostRegister(host, len, cudaHostRegisterDefault));
    return THAW_CUDA_OK;
}

extern "C" int thaw_cuda_unregister_host(void *host) {
    CHECK(cudaHostUnregister(host));
    return THAW_CUDA_OK;
}
