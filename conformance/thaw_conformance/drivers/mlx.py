"""The MLX driver: thaw_mlx.MLXEngine over mlx-lm models loaded from the zoo's HF checkpoints."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx_lm

from thaw_mlx import MLXEngine

from ..models import ARCHS, checkpoint


class MLXDriver:
    name = "mlx"
    zoo_checkpoints = True

    def versions(self) -> dict[str, str]:
        return {"mlx": mx.__version__, "mlx-lm": mlx_lm.__version__}

    def architectures(self) -> list[str]:
        return list(ARCHS)

    def start(self, arch: str, workdir: Path) -> MLXEngine:
        return MLXEngine.start(str(checkpoint(arch)))


def driver() -> MLXDriver:
    return MLXDriver()
