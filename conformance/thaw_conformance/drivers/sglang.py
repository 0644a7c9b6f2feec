"""The SGLang driver: thaw_sglang.ThawEngine engines on CPU, serving the zoo's checkpoints.

Requests go through SGLang's own Engine.generate, snapshots through thaw_sglang's public API (capture,
restore, ThawEngine.fork). SGLang honours a sampling seed only under deterministic inference, which it allows
with GPU attention backends only: on CPU seeded sampling is not reproducible, so this driver declares no
"seeded" feature. thaw_sglang captures between batches, so no request is in flight (no "mid_stream").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")  # SGLang reads it at import: set at this process's edge

import sglang  # noqa: E402
import torch  # noqa: E402

import thaw_sglang  # noqa: E402

from ..models import ARCHS, checkpoint  # noqa: E402
from ..sdk import Generation, Sampling, Unsupported  # noqa: E402

ENGINE_ARGS = dict(device="cpu", load_format="safetensors", skip_tokenizer_init=True, attention_backend="torch_native",
                   dtype="float32", max_total_tokens=4096, random_seed=0, disable_cuda_graph=True)


class SGLangEngine:
    def __init__(self, engine: thaw_sglang.ThawEngine) -> None:
        self.engine = engine

    def generate(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling) -> Generation:
        if sampling.temperature != 0:
            raise Unsupported("seeded sampling (SGLang needs deterministic inference, GPU backends only)")
        params = {"max_new_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        out = self.engine.generate(input_ids=list(prompt), sampling_params=params, return_logprob=True)
        meta = out["meta_info"]
        logprobs = [entry[0] for entry in meta["output_token_logprobs"]]
        return Generation(list(out["output_ids"]), meta["cached_tokens"], logprobs)

    def capture(self, path: Path) -> None:
        thaw_sglang.capture(self.engine, path)

    def restore(self, path: Path) -> None:
        thaw_sglang.restore(self.engine, path)

    def weights(self):
        return thaw_sglang.capture(self.engine).weights.tensors

    def kv(self):
        return thaw_sglang.capture(self.engine, weights=False)

    def submit(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling) -> str:
        raise Unsupported("thaw_sglang captures between batches only, with no request in flight")

    def step(self) -> None:
        raise Unsupported("no requests in flight")

    def drain(self) -> dict[str, list[int]]:
        return {}

    def fork(self, n: int, context: Sequence[int]) -> list["SGLangEngine"]:
        return [SGLangEngine(child) for child in self.engine.fork(n)]

    def close(self) -> None:
        self.engine.shutdown()


class SGLangDriver:
    name = "sglang"
    features = frozenset({"logprobs", "fork"})

    def versions(self) -> dict[str, str]:
        return {"sglang": sglang.__version__, "torch": torch.__version__}

    def architectures(self) -> list[str]:
        return list(ARCHS)

    def start(self, arch: str, workdir: Path) -> SGLangEngine:
        return SGLangEngine(thaw_sglang.ThawEngine(model_path=str(checkpoint(arch)), **ENGINE_ARGS))


def driver() -> SGLangDriver:
    return SGLangDriver()
