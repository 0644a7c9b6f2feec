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


def load_driver(spec: str) -> Driver:
    module, _, factory = BUILTIN.get(spec, spec).partition(":")
    return getattr(importlib.import_module(module), factory or "driver")()
