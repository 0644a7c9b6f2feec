/* libthaw: the byte mover under thaw_format.
 *
 * CRC32C (Castagnoli) with a hardware path chosen once per process, chunked checksums, parallel region
 * I/O that verifies every chunk before it reaches the caller's memory, gather/scatter of slabs, and of KV pages
 * through an engine's element order.
 * Every call is thread-safe; the parallel ones share one persistent thread pool. No function here takes
 * the GIL or calls back into Python.
 */
#ifndef THAW_H
#define THAW_H

#include <stddef.h>
#include <stdint.h>

#include "thaw_stage.h"

#define THAW_VERSION "0.1"

/* ---- CRC32C ---------------------------------------------------------------------------------------- */

/* CRC32C of data, continuing from crc (0 to start). Same values as the crc32c and google-crc32c packages. */
uint32_t thaw_crc32c(uint32_t crc, const void *data, size_t len);
/* The same, split across the thread pool for large inputs. */
uint32_t thaw_crc32c_parallel(uint32_t crc, const void *data, size_t len);
/* CRC32C of A||B from crc_a = CRC32C(A), crc_b = CRC32C(B) and len_b = len(B). */
uint32_t thaw_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);
/* CRC32C of each chunk_size piece of data (the last may be short) into out[ceil(len / chunk_size)]. */
void thaw_chunk_crcs(const void *data, size_t len, size_t chunk_size, uint32_t *out);
/* dst = src (len bytes, not overlapping), with the CRC32C of each chunk of the copy (as thaw_chunk_crcs of dst):
 * one pass, each block checksummed while the copy is in cache, split across the thread pool. */
void thaw_copy_chunk_crcs(void *dst, const void *src, size_t len, size_t chunk_size, uint32_t *out);

/* Name of the active implementation: "avx512-vpclmulqdq", "avx2-vpclmulqdq", "sse42", "armv8-crc",
 * "software". */
const char *thaw_crc32c_impl(void);
/* Implementations this CPU can run, best first, comma separated. */
const char *thaw_crc32c_available(void);
/* Make `name` the active implementation (for tests and benchmarks). 0 on success, -1 if unavailable. */
int thaw_crc32c_select(const char *name);

/* ---- thread pool ----------------------------------------------------------------------------------- */

/* Threads that parallel calls use (the caller counts as one): the CPU count, capped. */
int thaw_threads(void);

/* ---- region I/O ------------------------------------------------------------------------------------ */

/* One contiguous byte range of a file, cut into chunk_size chunks with one CRC32C each. */
typedef struct {
    uint64_t offset;     /* file offset of the first byte */
    void *buf;           /* memory side: source for writes, target for reads, NULL for verify */
    uint64_t len;        /* bytes */
    uint64_t chunk_size; /* > 0 */
    uint32_t *crcs;      /* ceil(len / chunk_size) CRCs: filled by writes, expected by reads and verifies */
} thaw_region;

#define THAW_DIRECT 1 /* try O_DIRECT for reads; falls back to buffered I/O where the filesystem refuses */
#define THAW_ZERO_GAPS 2 /* thaw_check_mapped: the bytes between consecutive regions must be zero (padding) */

typedef struct {
    int error;            /* errno of a failed read or write; THAW_EOF when the file is too short */
    int64_t bad_region;   /* index of the region holding the first bad chunk */
    int64_t bad_chunk;    /* index of that chunk within its region */
    int direct;           /* 1 if O_DIRECT was used for the whole call */
} thaw_io_status;

#define THAW_EOF (-1)
#define THAW_FAULT (-2) /* thaw_check_mapped: reading the mapping raised SIGBUS (the file shrank under it) */

/* Return codes of the region functions. */
#define THAW_OK 0
#define THAW_BAD_CHUNK 1 /* status.bad_region / bad_chunk name the first bad chunk in file order */
#define THAW_IO_ERROR 2  /* status.error says why */
#define THAW_BAD_GAP 3   /* thaw_check_mapped with THAW_ZERO_GAPS: a non-zero byte between status.bad_region - 1
                          * and status.bad_region (bad_chunk is -1) */

/* pwrite every region, computing its chunk CRCs from the same bytes while they are in cache. A gap of less
 * than 4 KiB between one region's end and the next region's start is written as zeros (it is padding), so
 * runs of small regions go out in one pwritev. */
int thaw_write_regions(int fd, const thaw_region *regions, size_t n, thaw_io_status *status);
/* Fill every region's buf from the file. Each chunk is read into a private staging buffer, checked, and
 * only then copied out, so buf never holds a byte of a chunk that failed its check. */
int thaw_read_regions(int fd, const thaw_region *regions, size_t n, int flags, thaw_io_status *status);
/* Check every region against the file with bounded memory (buf is ignored). */
int thaw_verify_regions(int fd, const thaw_region *regions, size_t n, int flags, thaw_io_status *status);
/* Check every region's chunks in memory at its buf (a mapping of the file, or a buffer holding it), in
 * parallel, reading each byte once; offsets only order the work. flags: THAW_ZERO_GAPS also checks that the
 * bytes between one region's end and the next region's buf are zero (regions must then be in memory order, else
 * THAW_IO_ERROR with EINVAL). A SIGBUS while reading, as when the mapped file was truncated, gives
 * THAW_IO_ERROR with status.error THAW_FAULT instead of ending the process (see guard.c for the limits). */
int thaw_check_mapped(const thaw_region *regions, size_t n, int flags, thaw_io_status *status);
/* Start writing the file's dirty pages in [offset, offset + len) to disk without waiting (sync_file_range with
 * SYNC_FILE_RANGE_WRITE on Linux, nothing elsewhere), so a save's final fsync finds most of them written:
 * the disk works while the next region is made. Only a hint: durability is still the fsync's. */
void thaw_start_writeback(int fd, uint64_t offset, uint64_t len);

/* ---- memory about to be written ------------------------------------------------------------------- */

/* Fault in the whole pages of [addr, addr + len) that are not resident yet, in 2 MiB pieces across the thread
 * pool, each piece only if its first page is not (madvise MADV_POPULATE_WRITE: one system call where stores
 * into new memory would trap once per page). For memory a caller is about to write whole. Returns the bytes
 * populated (0 off Linux), or -errno of a failed mincore or madvise (ENOMEM: part of the range is not mapped;
 * EINVAL: a kernel before 5.14); pieces may have been populated before a failure. */
int64_t thaw_prefault(void *addr, size_t len);

/* ---- gather / scatter ------------------------------------------------------------------------------ */

/* out[i*length : (i+1)*length] = src[offsets[i] : offsets[i]+length] for i < n.
 * Returns -1 when out_len < n*length, i+1 when offsets[i] is out of range (nothing copied), else 0. */
int64_t thaw_gather(const void *src, size_t src_len, const int64_t *offsets, size_t n, size_t length,
                    void *out, size_t out_len);
/* out[offsets[i] : offsets[i]+length] = src[i*length : (i+1)*length]; slabs in out must not overlap.
 * Returns -1 when src_len < n*length, i+1 when offsets[i] is out of range (nothing copied), else 0. */
int64_t thaw_scatter(const void *src, size_t src_len, void *out, size_t out_len, const int64_t *offsets,
                     size_t n, size_t length);

/* ---- KV pages ------------------------------------------------------------------------------------------- */

/* Where a token-major page's elements live in an engine block: the page is `rows` rows of `row_elems`
 * elements of `itemsize` bytes (1, 2, 4 or 8); row r starts at element row_start[r] of the block and its
 * elements are col_stride elements apart (negative allowed). One row of stride 1 is a plain slab. */
typedef struct {
    size_t itemsize;
    size_t rows;
    size_t row_elems;
    int64_t col_stride;
    const int64_t *row_start; /* rows entries, in elements from the block's first byte */
} thaw_page_layout;

/* Return codes of the page functions besides 0 (done) and i+1 (page i's block leaves the engine buffer). */
#define THAW_PAGES_SHORT_BUFFER (-1) /* the contiguous side holds fewer than n pages */
#define THAW_PAGES_BAD_LAYOUT (-2)   /* NULL or empty rows, or an itemsize other than 1, 2, 4, 8 */
#define THAW_PAGES_OVERLAP (-3)      /* the two buffers share memory */
#define THAW_PAGES_BAD_CHUNK (-4)    /* chunk_size is 0 or not a multiple of itemsize */
#define THAW_PAGES_REPEATED (-5)     /* scatter: two pages name the same block */
#define THAW_PAGES_NO_MEMORY (-6)
#define THAW_PAGES_REMOTE (-7)       /* remote scatter: reading the other process failed; *error says why */
#define THAW_PAGES_WRITE (-8)        /* gather into a file: a write failed; *error says why (EBADF: fd < 0) */
#define THAW_PAGES_FAULT (-9)        /* checked scatter: reading the pages raised SIGBUS (a mapped file shrank) */

/* Page i of out (n pages, contiguous) = the block at blocks + block_offsets[i], read through layout. With crcs !=
 * NULL, crcs[c] = CRC32C of out's chunk c (chunk_size bytes, the last may be short), computed in the same pass:
 * where the CRC kernel has a folding copy (x86 AVX2 with VPCLMULQDQ), the rows are plain runs of whole 128-byte
 * steps and chunk_size is a multiple of a row, in the move itself (each byte read once; rows that start 32-byte
 * aligned in out are written with streaming stores, not left in cache); likewise for transposed 4-byte rows of
 * whole 64-byte lines in groups of 16 (vLLM's float32 K) where the tile kernel is "avx512", the CRC32C kernel
 * "avx512-vpclmulqdq" and chunk_size a multiple of a page (rows 64-byte aligned in out are streamed). Without CRCs, in a gather of 4 MiB or more,
 * plain rows of 256 bytes or more that start 16-byte aligned in out are streamed too. Nothing is written unless
 * every check passes. */
int64_t thaw_gather_pages(const void *blocks, size_t blocks_len, const int64_t *block_offsets, size_t n,
                          const thaw_page_layout *layout, void *out, size_t out_len, size_t chunk_size,
                          uint32_t *crcs);
/* thaw_gather_pages into a file: the n pages are written at `offset` of fd (pwrite; the file grows as needed)
 * with crcs[c] (not NULL) the CRC32C of chunk c, computed in the same pass. Each thread gathers one 2 MiB-aligned
 * span of the file at a time into a tile of its own, sums its chunk pieces (the CRCs of chunks cut by a span
 * boundary are combined after) and writes the span with one pwrite while it is in cache, so the engine's memory
 * is read once, no buffer of the pages' size is needed, and the page cache can hold the file in 2 MiB folios.
 * THAW_PAGES_WRITE with *error = errno when a write fails (what was written before stays: write into a temporary
 * file). */
int64_t thaw_gather_pages_to_file(int fd, uint64_t offset, const void *blocks, size_t blocks_len,
                                  const int64_t *block_offsets, size_t n, const thaw_page_layout *layout,
                                  size_t chunk_size, uint32_t *crcs, int *error);
/* Name of the transposed-tile kernel the page functions use: "avx512", "avx2", "sse2" or "rows" (element by
 * element). */
const char *thaw_pages_impl(void);
/* Tile kernels this CPU can run, best first, comma separated. */
const char *thaw_pages_available(void);
/* Make `name` the page functions' tile kernel (for tests and benchmarks). 0 on success, -1 if unavailable. */
int thaw_pages_select(const char *name);
/* For tests: the summing 16 x 16 tiles' steps per page in the latest gather or scatter of pages (other than a
 * checked batch), by the groups of 16 rows each step read together: counts[0] of 1, [1] of 2, [2] of 4; all 0
 * where that call did not sum in those tiles. */
void thaw_pages_summed_groups(size_t counts[3]);
/* The inverse: write the n contiguous pages of `pages` into their blocks. */
int64_t thaw_scatter_pages(const void *pages, size_t pages_len, void *blocks, size_t blocks_len,
                           const int64_t *block_offsets, size_t n, const thaw_page_layout *layout);

/* thaw_scatter_pages with the pages checked on the way: chunk c (chunk_size bytes of `pages`, the last may be
 * short) must have CRC32C expected[c], one entry per chunk of the n pages; *bad_chunk = the first bad chunk,
 * or -1. Where the CRC kernel can fold while it copies (x86 AVX2 with VPCLMULQDQ) and the layout is plain rows
 * of whole 128-byte steps that chunks do not split, each chunk is moved and summed in one read of its bytes, so
 * a bad chunk is written too; elsewhere each chunk is checked just before it moves, while it is in cache, and a
 * bad chunk is not written. Either way the chunks before and after a bad one may already have been written:
 * scatter into blocks that are discarded on failure (fresh buffers), never into live state. The pages may be a
 * mapping of a file: a SIGBUS while reading them (the file was truncated under the mapping) gives
 * THAW_PAGES_FAULT, after other chunks may have moved, instead of ending the process (see guard.c for the
 * limits; THAW_PAGES_FAULT before any byte moves where libthaw's SIGBUS handler could not be installed). */
int64_t thaw_scatter_pages_checked(const void *pages, size_t pages_len, void *blocks, size_t blocks_len,
                                   const int64_t *block_offsets, size_t n, const thaw_page_layout *layout,
                                   size_t chunk_size, const uint32_t *expected, int64_t *bad_chunk);

/* One scatter of thaw_scatter_pages_checked_batch: thaw_scatter_pages_checked's arguments. */
typedef struct {
    const void *pages;
    size_t pages_len;
    void *blocks;
    size_t blocks_len;
    const int64_t *block_offsets;
    size_t n;
    const thaw_page_layout *layout;
    size_t chunk_size;
    const uint32_t *expected;
    int release_pages; /* 1: the pages are a read-only mapping of a file, unmapped once this scatter has moved */
} thaw_checked_scatter;

/* thaw_scatter_pages_checked of each of `count` scatters, all in one run of the thread pool (its threads woken
 * once, sharing the units of every scatter). Every scatter's ranges are checked before any byte of any of them
 * moves: a refusal returns thaw_scatter_pages_checked's code with *failed = that scatter's index. Otherwise
 * *failed is the first scatter (in order) with a bad chunk or a fault, *bad_chunk its first bad chunk (-1 for a
 * fault, which returns THAW_PAGES_FAULT), and *failed = -1 when every chunk passed. As with one scatter, other
 * chunks, of this and other scatters, may have been written: scatter into fresh buffers only. The scatters run
 * at once: no scatter's blocks may overlap another's pages or blocks (each is checked alone). A scatter with
 * release_pages set has the whole memory pages inside its pages unmapped (madvise MADV_DONTNEED, Linux) by the
 * thread that finishes its last unit: for a read-only mapping of a file, whose pages stay in the page cache, so
 * that a load of many tensors never maps the whole file at once (its pages are read again, if ever, from the
 * page cache; for anonymous or private memory this would zero them: never set it there). */
int64_t thaw_scatter_pages_checked_batch(const thaw_checked_scatter *scatters, size_t count, int64_t *failed,
                                         int64_t *bad_chunk);

/* thaw_scatter_pages with the pages in another process's memory: pages_len bytes at address `pages` in process
 * `pid`, read with process_vm_readv (Linux; the ptrace access check of a debugger: same user or CAP_SYS_PTRACE,
 * and whatever Yama and seccomp allow). One pass: each thread reads a unit of the pages into a tile of its own,
 * reused across calls, and moves it into the blocks from there. The first and last byte are read before any
 * byte moves, so a bad pid, a refused read or an address the process does not map gives THAW_PAGES_REMOTE
 * with *error set (ESRCH, EPERM, ENOSYS, EFAULT) and nothing written; a hole in the middle of the range (its
 * owner unmapped it during the call) fails the same way after other units may have moved. */
int64_t thaw_scatter_pages_remote(int pid, uint64_t pages, size_t pages_len, void *blocks, size_t blocks_len,
                                  const int64_t *block_offsets, size_t n, const thaw_page_layout *layout,
                                  int *error);
/* 0 if the first and last byte of each of the n ranges (addresses[i], lens[i]) of process pid are readable,
 * else the errno of the read that failed. */
int thaw_remote_readable(int pid, const uint64_t *addresses, const uint64_t *lens, size_t n);

#endif
