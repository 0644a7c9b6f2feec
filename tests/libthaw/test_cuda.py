"""The CUDA mover: its sources compile with nvcc into a library that loads without a GPU, and, where a GPU
is present, device gather and the pinned-ring file I/O round-trip bytes exactly and keep a corrupt chunk
out of device memory."""

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from thaw_format import _libthaw_cuda, mover

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "libthaw"))
import build_ffi  # noqa: E402

EXPORTS = ["thaw_cuda_device_count", "thaw_cuda_last_error", "thaw_cuda_gather_to_host",
           "thaw_cuda_scatter_from_host", "thaw_cuda_write_regions", "thaw_cuda_read_regions",
           "thaw_cuda_write_host", "thaw_cuda_read_host", "thaw_cuda_register_host", "thaw_cuda_unregister_host"]


def test_cuda_sources_compile_with_nvcc(tmp_path):
    if not shutil.which("nvcc"):
        pytest.skip("nvcc is not on PATH, so the CUDA sources cannot be compiled here")
    library = tmp_path / build_ffi.CUDA_LIBRARY
    build_ffi.build_cuda(str(library))
    loaded = ctypes.CDLL(str(library))  # links no libcudart.so: the runtime is static
    assert all(hasattr(loaded, name) for name in EXPORTS)
    assert loaded.thaw_cuda_device_count() >= 0  # 0 without a GPU, and no crash


def test_unavailable_reason_names_what_is_missing():
    reason = _libthaw_cuda.unavailable_reason(Path("/nonexistent/libthaw_cuda.so"))
    assert reason is not None
    assert any(word in reason for word in ("GPU", "not built", "libthaw"))


def skip_without_gpu(reason: str):
    """Skip naming why; scripts/gpu-check.sh sets THAW_REQUIRE_GPU=1, where a missing GPU path is a failure."""
    if os.environ.get("THAW_REQUIRE_GPU") == "1":
        pytest.fail(f"THAW_REQUIRE_GPU=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cuda_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        skip_without_gpu("no CUDA GPU visible to torch here")
    reason = _libthaw_cuda.unavailable_reason()
    if reason:
        skip_without_gpu(f"libthaw CUDA mover unavailable: {reason}")
    return torch


@pytest.mark.parametrize("call", ["write", "read"])
def test_host_regions_past_the_buffer_are_refused_before_any_copy(call):
    """The C side is given no host length: a region running past the buffer is refused here (no GPU needed:
    the check comes before the library is opened)."""
    region = (4096, 0x1000, 1 << 20, 1 << 20)
    with pytest.raises(ValueError, match="region 0 .* runs past the 10-byte host buffer"):
        if call == "write":
            _libthaw_cuda.write_regions(bytearray(10), [region])
        else:
            _libthaw_cuda.read_regions(bytes(10), [(*region, [0])])


def test_device_gather_and_scatter(cuda_torch):
    torch = cuda_torch
    kv = torch.randint(0, 255, (1000, 16, 8, 64), dtype=torch.uint8, device="cuda")  # [blocks, ...]
    block = kv[0].numel()
    blocks = [7, 0, 999, 123, 500]
    host = bytearray(len(blocks) * block)
    _libthaw_cuda.gather_to_host(kv.data_ptr(), [b * block for b in blocks], block, host)
    assert bytes(host) == kv[blocks].cpu().numpy().tobytes()
    restored = torch.zeros_like(kv)
    _libthaw_cuda.scatter_from_host(host, restored.data_ptr(), [b * block for b in blocks], block)
    assert torch.equal(restored[blocks], kv[blocks])


class FileEndpoint:
    def __init__(self, tmp_path, size):
        self.fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
        self.target = self.source = self.fd

    def corrupt(self, offset):
        os.pwrite(self.fd, bytes([os.pread(self.fd, 1, offset)[0] ^ 0xFF]), offset)

    def close(self):
        os.close(self.fd)


class HostEndpoint:
    def __init__(self, tmp_path, size):
        self.target = bytearray(size)

    @property
    def source(self):
        return bytes(self.target)  # read-only host memory

    def corrupt(self, offset):
        self.target[offset] ^= 0xFF

    def close(self):
        pass


class PinnedHostEndpoint(HostEndpoint):
    """Host memory pinned with the driver: the ring copies straight from and into it, no slot."""

    def __init__(self, tmp_path, size):
        super().__init__(tmp_path, size)
        self._pinned = _libthaw_cuda.pinned(self.target)
        self._pinned.__enter__()

    @property
    def source(self):
        return self.target  # the pinned memory itself

    def close(self):
        self._pinned.__exit__(None, None, None)


@pytest.mark.parametrize("endpoint", [FileEndpoint, HostEndpoint, PinnedHostEndpoint])
def test_device_round_trip_and_corruption(cuda_torch, tmp_path, endpoint):
    torch = cuda_torch
    chunk = 1 << 20
    tensors = [torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda") for n in (40 << 20, 12345, 3 << 20)]
    regions, offset = [], 4096
    for t in tensors:
        regions.append((offset, t.data_ptr(), t.numel(), chunk))
        offset = -(-(offset + t.numel()) // 4096) * 4096
    end = endpoint(tmp_path, offset)
    try:
        crcs = _libthaw_cuda.write_regions(end.target, regions)
        assert crcs == [mover.chunk_crcs(t.cpu().numpy(), chunk) for t in tensors]
        targets = [torch.zeros_like(t) for t in tensors]
        specs = [(o, d.data_ptr(), n, c, k) for (o, _, n, c), d, k in zip(regions, targets, crcs)]
        assert _libthaw_cuda.read_regions(end.source, specs) is None
        assert all(torch.equal(a, b) for a, b in zip(targets, tensors))
        end.corrupt(regions[0][0] + 5 * chunk + 17)  # chunk 5 of region 0
        targets = [torch.zeros_like(t) for t in tensors]
        specs = [(o, d.data_ptr(), n, c, k) for (o, _, n, c), d, k in zip(regions, targets, crcs)]
        assert _libthaw_cuda.read_regions(end.source, specs) == (0, 5)
        assert int(targets[0][5 * chunk:].count_nonzero()) == 0  # nothing from the bad piece on reached the GPU
    finally:
        end.close()


def test_ring_kept_across_calls_and_grown(cuda_torch):
    """The pinned slots outlive a call: calls of 1 MiB chunks, then a chunk larger than a slot (the slots are
    pinned again, larger), then small chunks again, each byte-exact through host memory and a corrupt chunk
    still refused."""
    torch = cuda_torch
    for chunk in (1 << 20, _libthaw_cuda.SLOT_BYTES * 2, 1 << 16):
        tensor = torch.randint(0, 255, (3 * chunk + 999,), dtype=torch.uint8, device="cuda")
        host = bytearray(tensor.numel())
        crcs = _libthaw_cuda.write_regions(host, [(0, tensor.data_ptr(), tensor.numel(), chunk)])
        assert bytes(host) == tensor.cpu().numpy().tobytes()
        assert crcs == [mover.chunk_crcs(tensor.cpu().numpy(), chunk)]
        back = torch.zeros_like(tensor)
        assert _libthaw_cuda.read_regions(bytes(host), [(0, back.data_ptr(), back.numel(), chunk, crcs[0])]) is None
        assert torch.equal(back, tensor)
        host[2 * chunk + 1] ^= 0xFF
        back = torch.zeros_like(tensor)
        assert _libthaw_cuda.read_regions(bytes(host), [(0, back.data_ptr(), back.numel(), chunk, crcs[0])]) == (0, 2)


def test_pinned_unpins_and_refuses_an_empty_buffer(cuda_torch):
    """Leaving the block unpins the memory (pinning it again works, where pinning pinned memory fails), and a
    buffer the ring reads through pinned memory only in part still moves right (the staged way)."""
    torch = cuda_torch
    host = bytearray(6 << 20)
    with _libthaw_cuda.pinned(host):
        with pytest.raises(RuntimeError, match="cudaHostRegister"):
            with _libthaw_cuda.pinned(host):
                pass
    tensor = torch.randint(0, 255, (len(host),), dtype=torch.uint8, device="cuda")
    with _libthaw_cuda.pinned(memoryview(host)[:1 << 20]):  # the first MiB only
        crcs = _libthaw_cuda.write_regions(host, [(0, tensor.data_ptr(), len(host), 1 << 20)])
        back = torch.zeros_like(tensor)
        assert _libthaw_cuda.read_regions(host, [(0, back.data_ptr(), len(host), 1 << 20, crcs[0])]) is None
    assert bytes(host) == tensor.cpu().numpy().tobytes() and torch.equal(back, tensor)
    with pytest.raises(ValueError, match="empty"):
        with _libthaw_cuda.pinned(bytearray()):
            pass


def test_ring_refuses_to_run_before_the_host_routines_are_set(cuda_torch):
    """The ring's host side is libthaw's (open_library hands the routines over): a caller that opens the
    library itself and skips that gets an error naming the missing call, not a crash."""
    script = (
        "from thaw_format import _libthaw_cuda as c\n"
        "lib, ffi = c._ffi.dlopen(str(c.LIBRARY)), c._ffi\n"
        "bad = ffi.new('int64_t[2]')\n"
        "code = lib.thaw_cuda_read_host(ffi.NULL, ffi.new('thaw_cuda_region[]', 1), 0, 1 << 20, 4, ffi.NULL, bad, bad + 1)\n"
        "print(code, ffi.string(lib.thaw_cuda_last_error()).decode())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.startswith("2 ") and "thaw_cuda_set_host_ops was not called" in out
