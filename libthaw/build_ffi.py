"""cffi (API mode) build of libthaw as the extension module thaw_format._libthaw.

The portable sources are compiled with the extension's flags (-O3). Each CPU-specific kernel is compiled on
its own with the -m flags of its instruction set (setup.py calls `compile_isa_objects`), so only the
dispatchers (crc32c.c, pages.c) decide, at run time, which kernel this CPU may execute.
"""

import platform
import shutil
import subprocess
from pathlib import Path

from cffi import FFI

MODULE = "thaw_format._libthaw"
ROOT = Path(__file__).resolve().parent
SRC = ROOT / "src"
INCLUDE = ROOT / "include"

PORTABLE_SOURCES = ["crc32c.c", "crc32c_sw.c", "pool.c", "io.c", "gather.c", "pages.c", "stage_plan.c", "guard.c", "prefault.c"]

_X86_64 = {
    "cpu_x86.c": [],
    "crc32c_sse42.c": ["-msse4.2", "-mpclmul"],
    "crc32c_avx2.c": ["-mavx2", "-mvpclmulqdq", "-mpclmul", "-msse4.2"],
    "crc32c_avx512.c": ["-mavx512f", "-mavx512vl", "-mvpclmulqdq", "-mpclmul", "-msse4.2"],
    "pages_avx2.c": ["-mavx2"],
    "pages_avx512.c": ["-mavx512f", "-mavx512vl", "-mvpclmulqdq", "-mpclmul", "-msse4.2"],
}
_ARM64 = {"cpu_arm64.c": [], "crc32c_armv8.c": ["-march=armv8-a+crc"]}
ISA_SOURCES = {"x86_64": _X86_64, "amd64": _X86_64, "aarch64": _ARM64, "arm64": _ARM64}

CFLAGS = ["-O3", "-Wall", "-fvisibility=hidden"]

CDEF = """
uint32_t thaw_crc32c(uint32_t crc, const void *data, size_t len);
uint32_t thaw_crc32c_parallel(uint32_t crc, const void *data, size_t len);
uint32_t thaw_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);
void thaw_chunk_crcs(const void *data, size_t len, size_t chunk_size, uint32_t *out);
void thaw_copy_chunk_crcs(void *dst, const void *src, size_t len, size_t chunk_size, uint32_t *out);
const char *thaw_crc32c_impl(void);
const char *thaw_crc32c_available(void);
int thaw_crc32c_select(const char *name);
int thaw_threads(void);

typedef struct {
    uint64_t offset;
    void *buf;
    uint64_t len;
    uint64_t chunk_size;
    uint32_t *crcs;
} thaw_region;

typedef struct {
    int error;
    int64_t bad_region;
    int64_t bad_chunk;
    int direct;
} thaw_io_status;

#define THAW_DIRECT 1
#define THAW_ZERO_GAPS 2
#define THAW_EOF -1
#define THAW_FAULT -2
#define THAW_OK 0
#define THAW_BAD_CHUNK 1
#define THAW_IO_ERROR 2
#define THAW_BAD_GAP 3

int thaw_write_regions(int fd, const thaw_region *regions, size_t n, thaw_io_status *status);
int thaw_read_regions(int fd, const thaw_region *regions, size_t n, int flags, thaw_io_status *status);
int thaw_verify_regions(int fd, const thaw_region *regions, size_t n, int flags, thaw_io_status *status);
int thaw_check_mapped(const thaw_region *regions, size_t n, int flags, thaw_io_status *status);
void thaw_start_writeback(int fd, uint64_t offset, uint64_t len);

int64_t thaw_prefault(void *addr, size_t len);

int64_t thaw_gather(const void *src, size_t src_len, const int64_t *offsets, size_t n, size_t length,
                    void *out, size_t out_len);
int64_t thaw_scatter(const void *src, size_t src_len, void *out, size_t out_len, const int64_t *offsets,
                     size_t n, size_t length);

typedef struct { uint64_t region; uint64_t start; uint64_t len; int32_t slot; } thaw_stage_piece;
int thaw_stage_slots(int slots);
uint64_t thaw_stage_slot_bytes(const uint64_t *lens, const uint64_t *chunk_sizes, size_t n, uint64_t slot_bytes);
int64_t thaw_stage_plan(const uint64_t *lens, const uint64_t *chunk_sizes, size_t n, uint64_t slot_bytes, int slots,
                        thaw_stage_piece *out, size_t cap);

typedef struct {
    size_t itemsize;
    size_t rows;
    size_t row_elems;
    int64_t col_stride;
    const int64_t *row_start;
} thaw_page_layout;

#define THAW_PAGES_SHORT_BUFFER -1
#define THAW_PAGES_BAD_LAYOUT -2
#define THAW_PAGES_OVERLAP -3
#define THAW_PAGES_BAD_CHUNK -4
#define THAW_PAGES_REPEATED -5
#define THAW_PAGES_NO_MEMORY -6
#define THAW_PAGES_REMOTE -7
#define THAW_PAGES_WRITE -8
#define THAW_PAGES_FAULT -9

int64_t thaw_gather_pages(const void *blocks, size_t blocks_len, const int64_t *block_offsets, size_t n,
                          const thaw_page_layout *layout, void *out, size_t out_len, size_t chunk_size,
                          uint32_t *crcs);
int64_t thaw_gather_pages_to_file(int fd, uint64_t offset, const void *blocks, size_t blocks_len,
                                  const int64_t *block_offsets, size_t n, const thaw_page_layout *layout,
                                  size_t chunk_size, uint32_t *crcs, int *error);
int64_t thaw_scatter_pages(const void *pages, size_t pages_len, void *blocks, size_t blocks_len,
                           const int64_t *block_offsets, size_t n, const thaw_page_layout *layout);
const char *thaw_pages_impl(void);
const char *thaw_pages_available(void);
int thaw_pages_select(const char *name);
void thaw_pages_summed_groups(size_t counts[3]);
int64_t thaw_scatter_pages_checked(const void *pages, size_t pages_len, void *blocks, size_t blocks_len,
                                   const int64_t *block_offsets, size_t n, const thaw_page_layout *layout,
                                   size_t chunk_size, const uint32_t *expected, int64_t *bad_chunk);
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
    int release_pages;
} thaw_checked_scatter;
int64_t thaw_scatter_pages_checked_batch(const thaw_checked_scatter *scatters, size_t count, int64_t *failed,
                                         int64_t *bad_chunk);
int64_t thaw_scatter_pages_remote(int pid, uint64_t pages, size_t pages_len, void *blocks, size_t blocks_len,
                                  const int64_t *block_offsets, size_t n, const thaw_page_layout *layout,
                                  int *error);
int thaw_remote_readable(int pid, const uint64_t *addresses, const uint64_t *lens, size_t n);
"""


CUDA_LIBRARY = "libthaw_cuda.so"  # beside the extension module, in thaw_format/
CUDA_SOURCES = [ROOT / "cuda" / "thaw_cuda.cu", SRC / "stage_plan.c"]  # the ring executes the shared plan
# SASS for Ampere and Hopper, and PTX that newer GPUs compile at load time.
NVCC_FLAGS = ["-O3", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-cudart", "static",
              "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"]


def build_cuda(output: str, nvcc: str = "") -> None:
    """Compile libthaw/cuda into the shared object `output` with nvcc (raises if nvcc is absent or fails)."""
    nvcc = nvcc or shutil.which("nvcc") or ""
    if not nvcc:
        raise FileNotFoundError("nvcc not found")
    subprocess.run([nvcc, *NVCC_FLAGS, "-I", str(INCLUDE), "-o", output, *map(str, CUDA_SOURCES)], check=True,
                   capture_output=True)


def isa_sources(machine: str = "") -> dict:
    """The CPU-specific sources for this machine and their compiler flags ({} where there are none)."""
    return ISA_SOURCES.get((machine or platform.machine()).lower(), {})


def compile_isa_objects(compiler, build_temp: str) -> list:
    """Compile each CPU-specific source with its own flags; return the object files."""
    objects = []
    for name, flags in isa_sources().items():
        objects += compiler.compile(
            [str(SRC / name)], output_dir=build_temp, include_dirs=[str(INCLUDE)], extra_postargs=CFLAGS + flags
        )
    return objects


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    MODULE,
    '#include "thaw.h"',
    sources=[str((SRC / name).relative_to(ROOT.parent)) for name in PORTABLE_SOURCES],
    include_dirs=[str(INCLUDE.relative_to(ROOT.parent))],
    # distutils relinks when one of these is newer than the module: the headers, and the CPU-specific sources
    # that setup.py compiles beside the extension.
    depends=[str(p.relative_to(ROOT.parent)) for p in sorted([*SRC.iterdir(), *INCLUDE.iterdir()])],
    extra_compile_args=CFLAGS,
    libraries=["pthread"],
)
