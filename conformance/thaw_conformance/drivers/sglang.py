"""The SGLang driver: thaw_sglang.SGLangEngine engines (ThawEngine on CPU), serving the zoo's checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")  # SGLang reads it at import: set at this process's edge

import sglang  # noqa: E402
import torch  # noqa: E402

from thaw_sglang import SGLangEngine  # noqa: E402

from ..models import ARCHS, checkpoint, uses_mla  # noqa: E402
from ..sdk import Unsupported  # noqa: E402

MLA_UNSUPPORTED = ("DeepSeek MLA: SGLang keeps its KV in an MLATokenToKVPool (one latent per token); thaw_sglang "
                   "handles the MHATokenToKVPool (per-head K and V) only")
ENGINE_ARGS = dict(device="cpu", load_format="safetensors", skip_tokenizer_init=True, attention_backend="torch_native",
                   dtype="float32", max_total_tokens=4096, random_seed=0, disable_cuda_graph=True)


class SGLangDriver:
    name = "sglang"
    zoo_checkpoints = True

    def versions(self) -> dict[str, str]:
        return {"sglang": sglang.__version__, "torch": torch.__version__}

    def architectures(self) -> list[str]:
        return list(ARCHS)

    def start(self, arch: str, workdir: Path) -> SGLangEngine:
        if uses_mla(arch):
            raise Unsupported(MLA_UNSUPPORTED)
        return SGLangEngine.start(model_path=str(checkpoint(arch)), **ENGINE_ARGS)


def driver() -> SGLangDriver:
    return SGLangDriver()
