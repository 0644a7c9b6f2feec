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


def _newest_source() -> float:
    """When libthaw's sources (C, CUDA, headers, build scripts) or this file last changed."""
    sources = [p for p in build_ffi.ROOT.rglob("*") if p.suffix in {".c", ".h", ".cu", ".py"}]
    return max(p.stat().st_mtime for p in [*sources, Path(__file__)])


class OptionalBuildExt(build_ext):
    current = ()  # the extensions an editable install found built in the checkout and up to date

    def _in_checkout(self, *names: str) -> list[str]:
        package_dir = self.get_finalized_command("build_py").get_package_dir("thaw_format")
        return [os.path.join(package_dir, name) for name in names]

    def _built_and_current(self, ext) -> bool:
        """Whether the checkout holds ext's build (and the CUDA mover's, where nvcc is here), newer than every
        source: the second and third editable installs (vLLM's and SGLang's venvs share the checkout and its
        abi3 module) then compile nothing, and never rewrite a library that running tests have mapped."""
        names = [os.path.basename(self.get_ext_filename(ext.name))]
        if shutil.which("nvcc"):
            names.append(build_ffi.CUDA_LIBRARY)
        built = self._in_checkout(*names)
        return all(os.path.exists(p) for p in built) and min(map(os.path.getmtime, built)) > _newest_source()

    def build_extension(self, ext):
        if self.editable_mode and ext.name == build_ffi.MODULE and self._built_and_current(ext):
            self.announce(f"{ext.name}: the checkout's build is newer than its sources, not built again", level=3)
            self.current = (*self.current, ext.name)
            return
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
        """In-place and editable builds: the CUDA library goes beside the extension module too; an extension
        found current is left as it is."""
        every = self.extensions
        self.extensions = [ext for ext in every if ext.name not in self.current]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = every
        built = getattr(self, "cuda_library", None)
        if built and os.path.exists(built):
            shutil.copyfile(built, *self._in_checkout(build_ffi.CUDA_LIBRARY))


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
