"""Builds libthaw, the C byte mover under thaw_format, as thaw_format._libthaw (cffi, API mode).

Project metadata lives in pyproject.toml. The build is optional: where no C compiler works the package
still installs, and thaw_format.backend() reports the pure-Python path and why.
"""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).resolve().parent / "libthaw"))
import build_ffi  # noqa: E402


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        try:
            if ext.name == build_ffi.MODULE:
                ext.extra_objects = list(ext.extra_objects or []) + build_ffi.compile_isa_objects(
                    self.compiler, self.build_temp
                )
            super().build_extension(ext)
        except Exception as exc:  # no compiler, or one too old for a flag: install the Python path instead
            self.warn(f"{ext.name} not built ({exc}); thaw_format falls back to its pure-Python path")


setup(cffi_modules=["libthaw/build_ffi.py:ffibuilder"], cmdclass={"build_ext": OptionalBuildExt})
