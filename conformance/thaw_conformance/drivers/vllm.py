"""The vLLM driver: thaw_vllm.VLLMEngine engines in this process, serving the zoo's checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: fast to start

import torch  # noqa: E402
import vllm  # noqa: E402

from thaw_vllm import VLLMEngine  # noqa: E402

from ..models import ARCHS, checkpoint, uses_mla  # noqa: E402
from ..sdk import Unsupported  # noqa: E402

MLA_UNSUPPORTED = ("DeepSeek MLA: thaw_vllm knows vLLM's CPU attention KV layout only, not the MLA latent cache "
                   "(and vLLM's CPU MLA backend takes latent sizes kv_lora_rank + qk_rope_head_dim of 320, 512 or "
                   "576 only; the zoo's tiny DeepSeek-V2 has 48)")
ENGINE_KWARGS = dict(dtype="float32", block_size=32, enforce_eager=True, skip_tokenizer_init=True,
                     max_model_len=4096, kv_cache_memory_bytes=64 << 20, enable_prefix_caching=True)


class VLLMDriver:
    name = "vllm"
    zoo_checkpoints = True

    def versions(self) -> dict[str, str]:
        return {"vllm": vllm.__version__, "torch": torch.__version__}

    def architectures(self) -> list[str]:
        return list(ARCHS)

    def start(self, arch: str, workdir: Path) -> VLLMEngine:
        if uses_mla(arch):
            raise Unsupported(MLA_UNSUPPORTED)
        return VLLMEngine.start(str(checkpoint(arch)), **ENGINE_KWARGS)


def driver() -> VLLMDriver:
    return VLLMDriver()
