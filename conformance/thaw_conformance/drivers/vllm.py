"""The vLLM driver: thaw_vllm.LLM engines in this process, serving the zoo's checkpoints.

Requests go through vLLM's own LLM / LLMEngine API (generate, add_request, step), and every snapshot
operation through thaw_vllm's public API (capture, restore, finish, fork). The weights a snapshot holds are
read by thaw_vllm from the checkpoint, because vLLM's CPU backend repacks linear weights in place.
"""

from __future__ import annotations

import gc
import itertools
import os
from pathlib import Path
from typing import Sequence

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: fast to start

import torch  # noqa: E402
import vllm  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

import thaw_format  # noqa: E402
import thaw_vllm  # noqa: E402

from ..models import ARCHS, checkpoint, uses_mla  # noqa: E402
from ..sdk import Generation, Sampling, Unsupported  # noqa: E402

MLA_UNSUPPORTED = ("DeepSeek MLA: thaw_vllm knows vLLM's CPU attention KV layout only, not the MLA latent cache "
                   "(and vLLM's CPU MLA backend takes latent sizes kv_lora_rank + qk_rope_head_dim of 320, 512 or "
                   "576 only; the zoo's tiny DeepSeek-V2 has 48)")
ENGINE_KWARGS = dict(dtype="float32", block_size=32, enforce_eager=True, skip_tokenizer_init=True,
                     max_model_len=4096, kv_cache_memory_bytes=64 << 20, enable_prefix_caching=True)


def _params(sampling: Sampling, max_tokens: int) -> vllm.SamplingParams:
    return vllm.SamplingParams(max_tokens=max_tokens, temperature=sampling.temperature, seed=sampling.seed,
                               ignore_eos=True, logprobs=0)


class VLLMEngine:
    def __init__(self, llm: thaw_vllm.LLM) -> None:
        self.llm = llm
        self.outputs: dict[str, list[int]] = {}  # in-flight requests' tokens so far
        self.resumed: list = []  # requests a restore resubmitted
        self._ids = itertools.count()

    def generate(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling) -> Generation:
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompt))], _params(sampling, max_tokens),
                                use_tqdm=False)[0]
        completion = out.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
        return Generation(list(completion.token_ids), out.num_cached_tokens or 0, logprobs)

    def submit(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling) -> str:
        request_id = f"conformance-{next(self._ids)}"
        self.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt)),
                                        _params(sampling, max_tokens))
        self.outputs[request_id] = []
        return request_id

    def step(self) -> dict[str, list[int]]:
        finished = {}
        for out in self.llm.llm_engine.step():
            self.outputs[out.request_id] = list(out.outputs[0].token_ids)
            if out.finished:
                finished[out.request_id] = self.outputs.pop(out.request_id)
        return finished

    def drain(self) -> dict[str, list[int]]:
        done = {r.request_id: r.output_token_ids for r in thaw_vllm.finish(self.llm, self.resumed).values()}
        self.resumed = []
        while self.llm.llm_engine.has_unfinished_requests():
            done.update(self.step())
        return done

    def capture(self, path: Path) -> None:
        thaw_format.save(thaw_vllm.capture(self.llm), path)

    def restore(self, path: Path) -> None:
        self.resumed = thaw_vllm.restore(self.llm, thaw_format.load(path))

    def weights(self):
        return thaw_vllm.capture(self.llm).weights.tensors

    def kv(self):
        return thaw_vllm.capture(self.llm, include_weights=False)

    def fork(self, n: int, context: Sequence[int]) -> list["ForkChild"]:
        """n engines in their own processes, started by thaw_vllm.fork from this engine's snapshot."""
        return [ForkChild(child) for child in thaw_vllm.fork(self.llm, n, context=list(context), processes=True)]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()


class ForkChild:
    """A thaw_vllm fork child (an engine in its own process) serving prompts that extend its context."""

    def __init__(self, child: thaw_vllm.Child) -> None:
        self.child = child

    def generate(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling) -> Generation:
        context = self.child.context
        if list(prompt[: len(context)]) != context:
            raise Unsupported("a fork child continues its context only; this prompt does not extend it")
        done = self.child.generate(list(prompt[len(context):]), _params(sampling, max_tokens))
        return Generation(done.token_ids, done.num_cached_tokens)

    def close(self) -> None:
        self.child.close()


class VLLMDriver:
    name = "vllm"
    features = frozenset({"logprobs", "seeded", "fork", "mid_stream", "mid_stream_seeded"})

    def versions(self) -> dict[str, str]:
        return {"vllm": vllm.__version__, "torch": torch.__version__}

    def architectures(self) -> list[str]:
        return list(ARCHS)

    def start(self, arch: str, workdir: Path) -> VLLMEngine:
        if uses_mla(arch):
            raise Unsupported(MLA_UNSUPPORTED)
        return VLLMEngine(thaw_vllm.LLM(str(checkpoint(arch)), **ENGINE_KWARGS))


def driver() -> VLLMDriver:
    return VLLMDriver()
