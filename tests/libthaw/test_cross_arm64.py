"""The ARMv8 CRC kernel, cross-compiled and run under qemu-user: every kernel of an aarch64 build against
its software kernel. Skips where the cross compiler or qemu is absent
(apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "libthaw"))
import build_ffi  # noqa: E402


def test_arm64_kernels_equal_software(tmp_path):
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not cc or not qemu:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64 to cross-compile and run the ARMv8 kernel")
    objects = []
    for name, flags in {**{n: [] for n in build_ffi.PORTABLE_SOURCES}, **build_ffi.isa_sources("aarch64")}.items():
        obj = tmp_path / f"{name}.o"
        subprocess.run([cc, "-O2", "-c", *flags, f"-I{build_ffi.INCLUDE}", str(build_ffi.SRC / name), "-o", str(obj)],
                       check=True)
        objects.append(str(obj))
    exe = tmp_path / "kernel_check"
    subprocess.run([cc, "-O2", "-static", f"-I{build_ffi.INCLUDE}", str(Path(__file__).with_name("kernel_check.c")),
                    *objects, "-lpthread", "-o", str(exe)], check=True)
    out = subprocess.run([qemu, str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "armv8-crc" in out.stdout and "bad 0" in out.stdout
