"""The engines ChatThaw is tested on, by name: how each starts, how its prefix cache is emptied, how it counts
cached tokens, and a plain reference for each (the same model run without thaw and without a prefix cache, one
prompt at a time), against which every reply's tokens are checked."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Callable, Optional

ENGINES = ("vllm", "mlx", "transformers", "sglang")
MAX_LEN = 4096  # the longest prompt vLLM and SGLang are started to take
STOP = [2, 4]  # </s>, <|im_end|>: what ChatThaw stops at with this tokenizer
VLLM_KWARGS = dict(dtype="float32", block_size=32, enforce_eager=True, skip_tokenizer_init=True,
                   max_model_len=MAX_LEN, kv_cache_memory_bytes=64 << 20)
SGLANG_KWARGS = dict(device="cpu", load_format="safetensors", skip_tokenizer_init=True,
                     attention_backend="torch_native", dtype="float32", context_length=MAX_LEN,
                     max_total_tokens=2 * MAX_LEN, random_seed=0, disable_cuda_graph=True)
# What each engine is imported as: a missing one skips its tests (fails under THAW_REQUIRE_ENGINES=1).
MODULES = {"vllm": ("thaw_vllm", "scripts/setup-vllm.sh"), "mlx": ("thaw_mlx", "scripts/setup-core.sh"),
           "transformers": ("thaw_transformers", "scripts/setup-core.sh"),
           "sglang": ("thaw_sglang", "scripts/setup-sglang.sh")}


@dataclass(frozen=True)
class Kind:
    name: str
    page: int  # the engine counts cached prompt tokens in whole pages of this many tokens (1: token by token)
    max_len: Optional[int]  # the longest prompt it takes, or None if it has no limit to refuse a prompt by

    def cached(self, n: int) -> int:
        """The engine's cached-token count for a prompt of which it holds the first n tokens' KV (n at most
        all but the prompt's last token, whose logits the request needs)."""
        return n // self.page * self.page


KINDS = {"vllm": Kind("vllm", 32, MAX_LEN), "mlx": Kind("mlx", 1, None),
         "transformers": Kind("transformers", 1, None), "sglang": Kind("sglang", 1, MAX_LEN)}


def start(name: str, model_dir) -> object:
    """The engine's thaw contract engine over the model."""
    if name == "vllm":
        import thaw_vllm

        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default: separate processes
        return thaw_vllm.VLLMEngine.start(str(model_dir), **VLLM_KWARGS)
    if name == "mlx":
        from thaw_mlx import MLXEngine

        return MLXEngine.start(str(model_dir))
    if name == "transformers":
        from thaw_transformers import TransformersEngine

        return TransformersEngine.start(str(model_dir), dtype="float32")
    if name == "sglang":
        from thaw_sglang import SGLangEngine

        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        return SGLangEngine.start(model_path=str(model_dir), **SGLANG_KWARGS)
    raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")


def evict(name: str, engine) -> None:
    """Empty the engine's prefix cache, as heavy traffic from other threads would (the engine is idle)."""
    if name == "vllm":
        assert engine.llm.reset_prefix_cache()
    elif name == "mlx":
        engine.sessions.clear()
    elif name == "transformers":
        from thaw_transformers.pages import PrefixCache

        engine.cache = PrefixCache(engine.cache.page_size)
    elif name == "sglang":
        assert engine.engine.flush_cache().success


def in_flight(name: str, engine) -> int:
    """How many requests the engine itself still serves, by its own state (vLLM: its client's unfinished
    requests; SGLang: its tokenizer manager's, with thaw's queue before it; MLX and transformers: their own)."""
    if name == "vllm":
        return engine.llm.llm_engine.get_num_unfinished_requests()
    if name == "mlx":
        return len(engine.running)
    if name == "transformers":
        return len(engine.requests)
    if name == "sglang":
        return len(engine.engine.tokenizer_manager.rid_to_state) + len(engine.queued)
    raise ValueError(f"unknown engine {name!r}")


def plain(name: str, model_dir, engine) -> tuple[Callable[[list, int], list], Callable[[], None]]:
    """(generate(prompt ids, max_tokens) -> output ids, close): greedy, stopping at STOP, nothing cached."""
    if name == "vllm":
        import vllm
        from vllm.inputs import TokensPrompt

        llm = vllm.LLM(str(model_dir), enable_prefix_caching=False, **VLLM_KWARGS)

        def generate(prompt, max_tokens):
            params = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=STOP)
            out = llm.generate([TokensPrompt(prompt_token_ids=list(prompt))], params, use_tqdm=False)[0]
            return list(out.outputs[0].token_ids)

        return generate, llm.llm_engine.engine_core.shutdown
    if name == "mlx":
        return _mlx_lm(engine.model), lambda: None
    if name == "transformers":
        return _transformers(engine.model), lambda: None
    if name == "sglang":
        import sglang
        from thaw_sglang._internals import stop_engine_processes

        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        reference = sglang.Engine(model_path=str(model_dir), disable_radix_cache=True, **SGLANG_KWARGS)

        def generate(prompt, max_tokens):
            params = {"temperature": 0.0, "max_new_tokens": max_tokens, "stop_token_ids": STOP}
            return list(reference.generate(input_ids=list(prompt), sampling_params=params)["output_ids"])

        def close():
            # SGLang's Engine.shutdown (also run at exit) kills every child of this process: the session's thaw
            # engine's processes and multiprocessing's resource tracker, whose relaunched successor then finds
            # the segments thaw registered before unknown (a KeyError traceback at exit). This engine's alone.
            atexit.unregister(reference.shutdown)
            stop_engine_processes(reference)

        return generate, close
    raise ValueError(f"unknown engine {name!r}")


def _mlx_lm(model) -> Callable[[list, int], list]:
    """mlx-lm's own generate_step over a fresh cache (argmax)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    def generate(prompt, max_tokens):
        out = []
        for token, _ in generate_step(mx.array(list(prompt)), model, max_tokens=max_tokens):
            out.append(int(token))
            if out[-1] in STOP:
                break
        return out

    return generate


def _transformers(model) -> Callable[[list, int], list]:
    """transformers' own generate (greedy)."""
    import torch

    def generate(prompt, max_tokens):
        with torch.inference_mode():
            out = model.generate(torch.tensor([list(prompt)]), max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=STOP, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    return generate
