"""The engine factories a snapshot file may name: what `wake` starts an engine with, when the file says which.

A snapshot file is untrusted input, and loading one must never run code it chose. A file that says "start me
with module:attribute" would be exactly that if the name were imported, so a file's factory is honoured only if
it is one of the adapters thaw ships, listed here by name (importing only that adapter's own module); any other
is refused, naming it, before anything is imported. A caller who trusts another factory passes it to `wake`
itself. The table is in code, not an entry-point group: an entry point is declared by whatever package is
installed, and adding one needs a reinstall; a third-party adapter's factory goes through `factory=` for now.

The factory's arguments come from the file too. The adapters' engines take options that run code of someone's
choosing (remote model code, classes named by path); a file may not set those: the caller sets them, in
`overrides`, or they keep their defaults.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

from ..errors import SnapshotError
from .child import resolve

# The contract adapters' factories (their launch_spec() names these), and the conformance template's.
REGISTERED = frozenset({
    "thaw_vllm.engine:VLLMEngine.start",
    "thaw_sglang.engine:SGLangEngine.start",
    "thaw_mlx.engine:MLXEngine.start",
    "thaw_transformers.engine:TransformersEngine.start",
    "thaw_conformance.template.adapter:ToyThawEngine.start",
})

# Engine options that import or run code named by their value (vLLM's and SGLang's; transformers' and MLX's
# factories take none): a file setting one to anything but off/empty is refused unless the caller overrides it.
CODE_OPTIONS = frozenset({
    "trust_remote_code", "worker_cls", "worker_extension_cls", "kv_transfer_config", "kv_connector_module_path",
    "logits_processors", "distributed_executor_backend", "model_loader_extra_config", "hf_overrides",
    "compilation_config", "speculative_config", "custom_logit_processor", "enable_custom_logit_processor",
    "json_model_override_args",
})


class UnregisteredFactory(SnapshotError):
    """The file names an engine factory (or a code-running option) that `wake` does not start on a file's word."""


def registered_factory(name: str) -> Callable:
    """The factory a file names, if REGISTERED lists it; UnregisteredFactory, importing nothing, otherwise."""
    if name not in REGISTERED:
        raise UnregisteredFactory(
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


def start_arguments(recorded: Mapping, overrides: Optional[Mapping]) -> dict:
    """The file's arguments with the caller's `overrides` over them; UnregisteredFactory if the file sets a
    code-running option (CODE_OPTIONS) that the caller does not override."""
    overrides = dict(overrides or {})
    if not all(isinstance(key, str) for key in overrides):
        raise TypeError(f"overrides maps argument names (str) to values, not {overrides!r}")
    refused = sorted(key for key, value in recorded.items()
                     if key in CODE_OPTIONS and key not in overrides and value not in (None, False, "", {}, []))
    if refused:
        raise UnregisteredFactory(
            f"the snapshot sets {', '.join(refused)}, which can run code of the file's choosing; an engine is "
            f"not started with it on a file's word: pass it in overrides (its value or None) if you trust it")
    return {**recorded, **overrides}
