"""fork(llm, n): n children that continue from the parent's exact context without prefill.

In-process children share the parent engine (its weights and its cached KV pages); each child's prompt is
the context plus its own suffix, served from the prefix cache. Process children are separate engines in
worker processes, started from one snapshot passed through shared memory (weights included, loaded with
load_format="thaw"); they talk to the parent over pipes in JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from . import api, transport


@dataclass
class Completion:
    token_ids: list[int]
    num_cached_tokens: int


def _params_dict(params) -> dict:
    fields = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "ignore_eos")
    return {name: getattr(params, name) for name in fields}


class Child:
    """One fork. `generate(suffix, params)` continues the context with `suffix` appended."""

    def __init__(self, context: list[int], llm=None, process: Optional[subprocess.Popen] = None) -> None:
        self.context = context
        self._llm, self._process = llm, process

    def generate(self, suffix: Sequence[int], params) -> Completion:
        prompt = self.context + list(suffix)
        if self._llm is not None:
            from vllm.inputs import TokensPrompt

            out = self._llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
            return Completion(list(out.outputs[0].token_ids), out.num_cached_tokens or 0)
        reply = self._call({"prompt": prompt, "params": _params_dict(params)})
        return Completion(reply["token_ids"], reply["num_cached_tokens"])

    def _call(self, message: dict) -> dict:
        self._send(message)
        return self._receive()

    def _send(self, message: dict) -> None:
        self._process.stdin.write(json.dumps(message) + "\n")
        self._process.stdin.flush()

    def _receive(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"fork child {self._process.pid} exited with {self._process.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"fork child {self._process.pid}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.stdin.close()
            self._process.wait(timeout=60)


def generate_all(children: Sequence[Child], suffixes: Sequence[Sequence[int]], params) -> list[Completion]:
    """Every child continues with its suffix at once: in-process children of one engine run as one batch,
    process children in parallel."""
    from vllm.inputs import TokensPrompt

    results: list[Optional[Completion]] = [None] * len(children)
    batches: dict[int, list[int]] = {}
    for i, (child, suffix) in enumerate(zip(children, suffixes)):
        if child._llm is not None:
            batches.setdefault(id(child._llm), []).append(i)
        else:
            child._send({"prompt": child.context + list(suffix), "params": _params_dict(params)})
    for indices in batches.values():
        prompts = [TokensPrompt(prompt_token_ids=children[i].context + list(suffixes[i])) for i in indices]
        for i, out in zip(indices, children[indices[0]]._llm.generate(prompts, params, use_tqdm=False)):
            results[i] = Completion(list(out.outputs[0].token_ids), out.num_cached_tokens or 0)
    for i, child in enumerate(children):
        if child._llm is None:
            reply = child._receive()
            results[i] = Completion(reply["token_ids"], reply["num_cached_tokens"])
    return results


def fork(llm, n: int, *, context: Optional[Sequence[int]] = None, processes: bool = False,
         model: Optional[str] = None, engine_kwargs: Optional[dict] = None) -> list[Child]:
    """n children continuing `context` (default: the prompt of a thaw_vllm.LLM's last single-prompt generate).

    processes=True starts n engines in worker processes; they need the model directory and the plain
    construction arguments (taken from a thaw_vllm.LLM, or passed as model= and engine_kwargs=).
    """
    context = context if context is not None else getattr(llm, "thaw_context", None)
    if context is None:
        raise ValueError("fork needs the context to continue: pass context=token ids")
    context = list(context)
    if not processes:
        return [Child(context, llm=llm) for _ in range(n)]

    if model is None or engine_kwargs is None:
        known_model, known_kwargs = api.launch_arguments(llm)
        model, engine_kwargs = model or known_model, dict(known_kwargs if engine_kwargs is None else engine_kwargs)
    snapshot = api.capture(llm, include_weights=True, chains=[context])
    with transport.SharedSnapshot(snapshot) as shared:
        config = json.dumps({"model": model, "engine_kwargs": engine_kwargs, "source": shared.source})
        procs = [subprocess.Popen([sys.executable, "-m", "thaw_vllm.child", config], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=dict(os.environ)) for _ in range(n)]
        children = [Child(context, process=p) for p in procs]
        try:
            for child in children:  # each child has copied the snapshot out once it reports ready
                child._call({"ready": True})
        except BaseException:
            for p in procs:
                p.kill()
            raise
    return children
