"""The SGLang driver: thaw_sglang.ThawEngine engines on CPU, serving the zoo's checkpoints.

Requests go through SGLang's own Engine.generate, snapshots through thaw_sglang's public API (capture,
restore, resume, pause, ThawEngine.fork). SGLang honours a sampling seed only under deterministic inference
(otherwise its sampler draws from torch's global generator), which it allows with GPU attention backends only:
on CPU seeded sampling is not reproducible, so this driver declares neither "seeded" nor "mid_stream_seeded".

In-flight requests: `submit` streams a request with the engine set to pause after one batch (its prefill, the
first token); each `step` lets exactly one more batch run (`ThawEngine.run_batches`), so however slow this
process is, a capture finds the request where the steps left it, running, never finished.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")  # SGLang reads it at import: set at this process's edge

import sglang  # noqa: E402
import torch  # noqa: E402

import thaw_format  # noqa: E402
import thaw_sglang  # noqa: E402

from ..models import ARCHS, checkpoint, uses_mla  # noqa: E402
from ..sdk import Generation, Sampling, Unsupported  # noqa: E402

MLA_UNSUPPORTED = ("DeepSeek MLA: SGLang keeps its KV in an MLATokenToKVPool (one latent per token); thaw_sglang "
                   "handles the MHATokenToKVPool (per-head K and V) only")
ENGINE_ARGS = dict(device="cpu", load_format="safetensors", skip_tokenizer_init=True, attention_backend="torch_native",
                   dtype="float32", max_total_tokens=4096, random_seed=0, disable_cuda_graph=True)


@dataclass
class _Streaming:
    rid: str
    chunks: Iterator[dict]  # SGLang's output stream
    latest: dict  # the last chunk read


def _params(sampling: Sampling, max_tokens: int) -> dict:
    if sampling.temperature != 0:
        raise Unsupported("seeded sampling (SGLang needs deterministic inference, GPU backends only)")
    return {"max_new_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}


class SGLangEngine:
    def __init__(self, engine: thaw_sglang.ThawEngine) -> None:
        self.engine = engine
        self.streaming: Optional[_Streaming] = None  # the submitted request
        self.restored: Optional[thaw_format.Snapshot] = None  # the last snapshot restored, to resume
        self._ids = itertools.count()

    def generate(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling) -> Generation:
        out = self.engine.generate(input_ids=list(prompt), sampling_params=_params(sampling, max_tokens),
                                   return_logprob=True)
        meta = out["meta_info"]
        logprobs = [entry[0] for entry in meta["output_token_logprobs"]]
        return Generation(list(out["output_ids"]), meta["cached_tokens"], logprobs)

    def capture(self, path: Path) -> None:
        thaw_sglang.capture(self.engine, path)

    def restore(self, path: Path) -> None:
        thaw_sglang.restore(self.engine, path)
        self.restored = thaw_format.load(path)

    def weights(self):
        return thaw_sglang.capture(self.engine).weights.tensors

    def kv(self):
        return thaw_sglang.capture(self.engine, weights=False)

    def submit(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling) -> str:
        if self.streaming is not None:
            raise Unsupported("this driver steps one submitted request at a time")
        rid = f"conformance-{next(self._ids)}"
        stream = self.engine.generate(input_ids=list(prompt), sampling_params=_params(sampling, max_tokens),
                                      stream=True, rid=rid)
        self.engine.run_batches(1)  # the prefill, then a pause
        self.streaming = _Streaming(rid, stream, next(stream))  # sends the request; returns at its first token
        return rid

    def step(self) -> None:
        """Let the paused engine run one decode step and read the token it gives."""
        if self.streaming is not None:
            self.engine.run_batches(1)
            self.streaming.latest = next(self.streaming.chunks, self.streaming.latest)

    def drain(self) -> dict[str, list[int]]:
        """Finish the submitted request (unpausing the engine) and the requests the last restore holds."""
        done = {}
        if self.streaming is not None:
            streaming, self.streaming = self.streaming, None
            self.engine.unpause()
            for chunk in streaming.chunks:
                streaming.latest = chunk
            done[streaming.rid] = list(streaming.latest["output_ids"])  # a chunk holds every output token so far
        if self.restored is not None:
            pending = [r for r in self.restored.scheduler.requests if r.status != "finished"]
            for request, out in zip(pending, thaw_sglang.resume(self.engine, self.restored)):
                done[request.id] = request.output_token_ids + list(out["output_ids"])
            self.restored = None
        return done

    def fork(self, n: int, context: Sequence[int]) -> list["SGLangEngine"]:
        return [SGLangEngine(child) for child in self.engine.fork(n)]

    def close(self) -> None:
        self.engine.shutdown()


class SGLangDriver:
    name = "sglang"
    features = frozenset({"logprobs", "fork", "mid_stream"})

    def versions(self) -> dict[str, str]:
        return {"sglang": sglang.__version__, "torch": torch.__version__}

    def architectures(self) -> list[str]:
        return list(ARCHS)

    def start(self, arch: str, workdir: Path) -> SGLangEngine:
        if uses_mla(arch):
            raise Unsupported(MLA_UNSUPPORTED)
        return SGLangEngine(thaw_sglang.ThawEngine(model_path=str(checkpoint(arch)), **ENGINE_ARGS))


def driver() -> SGLangDriver:
    return SGLangDriver()
