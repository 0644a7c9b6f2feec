"""Fixtures for the libthaw tests: the native module (skip where it was not built, fail in CI) and a way to
run a test against every CRC32C kernel, and every page-tile kernel, this CPU has."""

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


# The native module's kernel families: (its "available" list, "impl" and "select" functions), by name.
FAMILIES = {"crc32c": ("thaw_crc32c_available", "thaw_crc32c_impl", "thaw_crc32c_select"),
            "pages": ("thaw_pages_available", "thaw_pages_impl", "thaw_pages_select")}


def _available(family):
    if mover._lib is None:
        return []
    return mover._ffi.string(getattr(mover._lib, FAMILIES[family][0])()).decode().split(",")


def _selection(native, family):
    """A function that makes a kernel of `family` the active one; the original is restored after the test."""
    ffi, lib = native
    _, impl, select = (getattr(lib, name) for name in FAMILIES[family])
    original = ffi.string(impl())
    yield lambda name: select(name.encode()) == 0 or pytest.fail(f"{family} kernel {name} unavailable")
    select(original)


def available_kernels():
    return _available("crc32c")


def available_tiles():
    return _available("pages")


@pytest.fixture
def select_kernel(native):
    """select_kernel(name) makes `name` the active CRC32C kernel for the rest of the test."""
    yield from _selection(native, "crc32c")


@pytest.fixture
def select_tiles(native):
    """select_tiles(name) makes `name` the page functions' tile kernel for the rest of the test."""
    yield from _selection(native, "pages")
