"""The toy engine's conformance driver: engine start-up, nothing else. A new engine's driver has this shape:
`start` builds the engine for a zoo architecture and returns the adapter's contract engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import adapter
from .adapter import ToyThawEngine
from .engine import ToyModelConfig

# The toy has one architecture; its "zoo" is two seeds of it, so that a wrong-model restore can be tried.
ARCHITECTURES = {"toy": ToyModelConfig(seed=0), "toy-seed1": ToyModelConfig(seed=1)}


class ToyDriver:
    name = "template"

    def versions(self) -> dict[str, str]:
        return {"engine": f"{adapter.ENGINE_NAME} {adapter.ENGINE_VERSION}", "numpy": np.__version__}

    def architectures(self) -> list[str]:
        return list(ARCHITECTURES)

    def start(self, arch: str, workdir: Path) -> ToyThawEngine:
        return ToyThawEngine.start(**dataclasses.asdict(ARCHITECTURES[arch]))


def driver() -> ToyDriver:
    return ToyDriver()
