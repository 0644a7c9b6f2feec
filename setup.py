"""Builds libthaw, the C byte mover under thaw_format, as thaw_format._libthaw (cffi, API mode), and, where
nvcc is present, its CUDA mover as thaw_format/libthaw_cuda.so (opened at run time only if a GPU is there).

Project metadata lives in pyproject.toml. Both builds are optional: where no C compiler works the package
still installs, and thaw_format.backend() reports the pure-Python path and why. The golden vectors of
spec/vectors are copied into thaw_conformance/golden_vectors, so an installed thaw-conformance has them.
"""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cffi
from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent / "libthaw"))
import build_ffi  # noqa: E402


STAMP = ".libthaw-build.json"  # beside the module in the checkout: what its build was made from (git-ignored)


def _version(command: str) -> str:
    """`command --version`'s output, or why there is none (a part of what a build is made from)."""
    try:
        return subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{command}: {exc}"


def _inputs_digest(compiler: str) -> str:
    """A digest of everything libthaw's build is made from: every file under libthaw/, setup.py and
    pyproject.toml, the compiler flags in the environment, the compiler's, nvcc's and cffi's versions."""
    here = Path(__file__).resolve().parent
    files = [p for p in sorted(build_ffi.ROOT.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    digest = hashlib.sha256()
    for path in [*files, here / "setup.py", here / "pyproject.toml"]:
        digest.update(f"{path.relative_to(here)}\0".encode() + path.read_bytes())
    flags = {name: os.environ.get(name, "") for name in ("CC", "CFLAGS", "CPPFLAGS", "LDFLAGS")}
    nvcc = shutil.which("nvcc")
    versions = [_version(compiler), _version(nvcc) if nvcc else "no nvcc", cffi.__version__]
    digest.update(json.dumps([flags, versions]).encode())
    return digest.hexdigest()


def _write_atomically(path: str, write) -> None:
    """Make path by write(temporary path) beside it, then rename: a process that has the old file mapped keeps
    it, and one that opens path finds the old file or the new one, never a part."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


class OptionalBuildExt(build_ext):
    current = ()  # the extensions an in-place or editable build found built in the checkout, and current
    digest = ""  # of the inputs of libthaw's build, once build_extension has the compiler
    cuda = "no nvcc"  # what became of the CUDA mover's build: built, failed, no nvcc

    def _in_checkout(self, name: str) -> str:
        return os.path.join(self.get_finalized_command("build_py").get_package_dir("thaw_format"), name)

    def _built_and_current(self) -> bool:
        """Whether the checkout holds a build of libthaw (and of its CUDA mover, where that was built) made from
        the same inputs: the installs after the first (the venvs share the checkout and its abi3 module) then
        compile nothing. A CUDA build that failed with the same inputs would fail again."""
        try:
            with open(self._in_checkout(STAMP)) as file:
                stamp = json.load(file)
        except (OSError, ValueError):
            return False
        module = self._in_checkout(os.path.basename(self.get_ext_filename(build_ffi.MODULE)))
        cuda_there = stamp.get("cuda") != "built" or os.path.exists(self._in_checkout(build_ffi.CUDA_LIBRARY))
        return stamp.get("digest") == self.digest and os.path.exists(module) and cuda_there

    def run(self):
        self.into_checkout = self.inplace or self.editable_mode  # run() clears inplace while it builds
        super().run()

    def build_extension(self, ext):
        if ext.name == build_ffi.MODULE:
            self.digest = _inputs_digest(self.compiler.compiler_so[0])
            if self.into_checkout and not self.force and self._built_and_current():
                self.announce(f"{ext.name}: the checkout's build is current (same inputs), not built again",
                              level=logging.INFO)
                self.current = (*self.current, ext.name)
                return
            self.force = True  # distutils would copy build/'s module, made from other inputs, if newer than its sources
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
                self.cuda_library, self.cuda = target, "built"
            except Exception as exc:  # the CPU package is complete without it
                self.warn(f"libthaw CUDA mover not built ({exc})")
                self.cuda = "failed"

    def copy_extensions_to_source(self):
        """In-place and editable builds: each built extension, and the CUDA library, goes into the checkout (by
        rename, so that running tests keep the library they mapped), then the stamp of what they were built
        from; an extension found current is left as it is."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            in_checkout, built = self._get_inplace_equivalent(build_py, ext)
            if ext.name not in self.current and os.path.exists(built):
                _write_atomically(in_checkout, lambda temporary: shutil.copy2(built, temporary))
                if ext.name == build_ffi.MODULE:
                    stamp = json.dumps({"digest": self.digest, "cuda": self.cuda})
                    built_cuda = getattr(self, "cuda_library", None)
                    if built_cuda:
                        _write_atomically(self._in_checkout(build_ffi.CUDA_LIBRARY),
                                          lambda temporary: shutil.copy2(built_cuda, temporary))
                    _write_atomically(self._in_checkout(STAMP), lambda temporary: Path(temporary).write_text(stamp))


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
