"""The transformers driver: thaw_transformers.TransformersEngine engines in this process, serving the zoo's
checkpoints on the CPU."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from thaw_transformers import TransformersEngine

from ..models import ARCHS, checkpoint


class TransformersDriver:
    name = "transformers"
    zoo_checkpoints = True

    def versions(self) -> dict[str, str]:
        return {"transformers": transformers.__version__, "torch": torch.__version__}

    def architectures(self) -> list[str]:
        return list(ARCHS)

    def start(self, arch: str, workdir: Path) -> TransformersEngine:
        return TransformersEngine.start(str(checkpoint(arch)))


def driver() -> TransformersDriver:
    return TransformersDriver()
