"""Fixtures for the libthaw tests: the native module (skip where it was not built, fail in CI) and a way to
run a test against every CRC32C kernel this CPU has."""

import os

import pytest

from thaw_format import mover


@pytest.fixture(scope="session")
def native():
    """(ffi, lib) of thaw_format._libthaw; skips where it was not built, fails under THAW_REQUIRE_ENGINES=1."""
    if mover._lib is None:
        reason = f"libthaw not built here: {mover.backend()}"
        if os.environ.get("THAW_REQUIRE_ENGINES") == "1":
            pytest.fail(f"THAW_REQUIRE_ENGINES=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return mover._ffi, mover._lib


def available_kernels():
    if mover._lib is None:
        return []
    return mover._ffi.string(mover._lib.thaw_crc32c_available()).decode().split(",")


@pytest.fixture
def select_kernel(native):
    """select_kernel(name) makes `name` the active CRC32C kernel for the rest of the test."""
    ffi, lib = native
    original = ffi.string(lib.thaw_crc32c_impl())
    yield lambda name: lib.thaw_crc32c_select(name.encode()) == 0 or pytest.fail(f"kernel {name} unavailable")
    lib.thaw_crc32c_select(original)
