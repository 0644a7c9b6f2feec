"""Builds libthaw, the C byte mover under thaw_format, as thaw_format._libthaw (cffi, API mode), and, where
nvcc is present, its CUDA mover as thaw_format/libthaw_cuda.so (opened at run time only if a GPU is there).

Project metadata lives in pyproject.toml. Both builds are optional: where no C compiler works the package
still installs, and thaw_format.backend() reports the pure-Python path and why. The golden vectors of
spec/vectors are copied into thaw_conformance/golden_vectors, so an installed thaw-conformance has them.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

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
            return
        if ext.name == build_ffi.MODULE and shutil.which("nvcc"):
            target = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), build_ffi.CUDA_LIBRARY)
            try:
                build_ffi.build_cuda(target)
                self.cuda_library = target
            except Exception as exc:  # the CPU package is complete without it
                self.warn(f"libthaw CUDA mover not built ({exc})")

    def copy_extensions_to_source(self):
        """In-place and editable builds: the CUDA library goes beside the extension module too."""
        super().copy_extensions_to_source()
        built = getattr(self, "cuda_library", None)
        if built and os.path.exists(built):
            package_dir = self.get_finalized_command("build_py").get_package_dir("thaw_format")
            shutil.copyfile(built, os.path.join(package_dir, build_ffi.CUDA_LIBRARY))


class BuildPyWithVectors(build_py):
    def run(self):
        super().run()
        vectors = Path(__file__).resolve().parent / "spec" / "vectors"
        target = Path(self.build_lib) / "thaw_conformance" / "golden_vectors"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(vectors.glob("*.thaw")) + sorted(vectors.glob("*.json")):
            self.copy_file(str(path), str(target / path.name))


setup(cffi_modules=["libthaw/build_ffi.py:ffibuilder"],
      cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPyWithVectors})
