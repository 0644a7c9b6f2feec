"""The engine factories a snapshot file may name: what `wake` starts an engine with, when the file says which.

A snapshot file is untrusted input, and loading one must never run code it chose. A file that says "start me
with module:attribute" would be exactly that if the name were imported, so a file's factory is honoured only if
it is one of the adapters thaw ships, listed here by name (importing only that adapter's own module); any other
is refused, naming it, before anything is imported. A caller who trusts another factory passes it to `wake`
itself. The table is in code, not an entry-point group: an entry point is declared by whatever package is
installed, and adding one needs a reinstall; a third-party adapter's factory goes through `factory=` for now.
The factory's arguments come from the file too: which it may set is each adapter's own list (thaw_format.sdk.launch).
"""

from __future__ import annotations

import importlib
from typing import Callable, Union

from .launch import RefusedLaunch

# The contract adapters' factories (their launch_spec() names these). Tests add the conformance template's.
REGISTERED = frozenset({
    "thaw_vllm.engine:VLLMEngine.start",
    "thaw_sglang.engine:SGLangEngine.start",
    "thaw_mlx.engine:MLXEngine.start",
    "thaw_transformers.engine:TransformersEngine.start",
})


def resolve(factory: str):
    """The callable a "module:attribute.attribute" path names. Here, not in thaw_format.sdk.child, which runs as
    `python -m` and so must not be imported by the package (runpy warns on every child's stderr otherwise)."""
    module, _, attributes = factory.partition(":")
    target = importlib.import_module(module)
    for name in attributes.split("."):
        target = getattr(target, name)
    return target


def registered_factory(name: str) -> Callable:
    """The factory a file names, if REGISTERED lists it; RefusedLaunch, importing nothing, otherwise."""
    if name not in REGISTERED:
        raise RefusedLaunch(
            f"the snapshot names the engine factory {name!r}, which is not one of thaw's adapters "
            f"({', '.join(sorted(REGISTERED))}); nothing was imported. If you trust it, pass factory= to wake")
    return resolve(name)


def chosen_factory(factory: Union[str, Callable]) -> Callable:
    """The factory a caller passes: a callable, or the "module:attribute" path of one (the caller's own word)."""
    if callable(factory):
        return factory
    if isinstance(factory, str) and ":" in factory:
        return resolve(factory)
    raise TypeError(f"factory is a callable or a 'module:attribute' path, not {type(factory).__name__} {factory!r}")
