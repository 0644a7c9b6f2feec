"""Engine drivers by name. A driver spec is a built-in name or "module:factory" for an adapter outside thaw."""

from __future__ import annotations

import importlib

from ..sdk import Driver

BUILTIN = {
    "template": "thaw_conformance.template.driver:driver",
    "mlx": "thaw_conformance.drivers.mlx:driver",
    "vllm": "thaw_conformance.drivers.vllm:driver",
    "sglang": "thaw_conformance.drivers.sglang:driver",
    "transformers": "thaw_conformance.drivers.transformers:driver",
}
# The repository virtualenv each built-in driver runs in (scripts/setup-*.sh make them).
VENVS = {"template": ".venv", "mlx": ".venv", "vllm": ".venv-vllm", "sglang": ".venv-sglang", "transformers": ".venv"}


class DriverNotFound(ImportError):
    """The driver's module or factory does not exist: a misspelt spec, unlike an engine not installed here (an
    ImportError from inside the driver's module)."""


def load_driver(spec: str) -> Driver:
    module, _, factory = BUILTIN.get(spec, spec).partition(":")
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise DriverNotFound(f"no module {module!r}") from None
        raise
    if not hasattr(found, factory or "driver"):
        raise DriverNotFound(f"module {module!r} has no {factory or 'driver'!r}")
    return getattr(found, factory or "driver")()
