"""VLLMEngine: the adapter contract (thaw_format.sdk.contract) over one vLLM LLM in this process.

    engine = VLLMEngine.start(model_dir, dtype="float32", ...)   # a thaw_vllm.LLM: vllm.LLM's arguments
    engine = VLLMEngine(llm)                                     # or wrap an LLM made with thaw's extensions

Requests go through vLLM's own LLM / LLMEngine API (generate, add_request, step); snapshots through this
package's capture / restore.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Optional, Sequence

import thaw_format
from thaw_format import ModelInfo, SamplingParams
from thaw_format.sdk import Finished, Generation, LaunchSpec, LocalDirectory, OneOf, Progress, Resumed, fork
from thaw_format.sdk.contract import check_params
from thaw_format.sdk.inplace import check_launchable
from thaw_format.sdk.request_ids import RequestIds

from . import api, sampling
from .requests import run_to_completion


class VLLMEngine:
    name = "vllm"

    def __init__(self, llm) -> None:
        self.llm = llm
        self._previous: dict[str, list[int]] = {}  # resumed requests' output before their snapshot
        self._progress: dict[str, Progress] = {}  # requests that advanced since the last progress()
        self._latest: dict[str, Progress] = {}  # each unfinished request's last Progress: what an abort reports
        self._ids = RequestIds("thaw")

    @classmethod
    def start(cls, model: str, **engine_kwargs) -> "VLLMEngine":
        """A thaw_vllm.LLM of vllm.LLM's arguments, wrapped."""
        from .llm import LLM

        return cls(LLM(model, **engine_kwargs))

    @classmethod
    def capabilities(cls) -> frozenset:
        return frozenset({"logprobs", "seeded", "fork", "fork_processes", "mid_stream", "mid_stream_seeded",
                          "streaming"})

    def model_info(self) -> ModelInfo:
        return ModelInfo(**api.describe(self.llm)["model"])

    def _params(self, params: SamplingParams):
        # logprobs=0: vLLM returns the sampled token's log-probability, which Generation carries
        return sampling.to_vllm(params if params.logprobs is not None else dataclasses.replace(params, logprobs=0))

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        from vllm.inputs import TokensPrompt

        check_params(params)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in prompt])], self._params(params),
                                use_tqdm=False)[0]
        completion = out.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs or [], completion.token_ids)]
        return Generation(list(completion.token_ids), out.num_cached_tokens or 0, logprobs or None)

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> str:
        from vllm.inputs import TokensPrompt

        check_params(params)
        request_id = self._new_id()
        self.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=[int(t) for t in prompt]),
                                        self._params(params))
        return request_id

    def _new_id(self) -> str:
        """A fresh id, never one a request in flight holds (a restored request keeps the id of its snapshot)."""
        return self._ids.fresh(self._previous.keys() | self._latest.keys())

    def step(self) -> dict[str, list[int]]:
        finished = {}
        for out in self.llm.llm_engine.step():
            tokens = self._previous.get(out.request_id, []) + list(out.outputs[0].token_ids)
            progress = self._progress[out.request_id] = Progress(tokens, out.num_cached_tokens or 0, out.finished)
            self._latest[out.request_id] = progress
            if out.finished:
                self._previous.pop(out.request_id, None)
                self._latest.pop(out.request_id, None)
                finished[out.request_id] = tokens
        return finished

    def abort(self, request_id: str) -> bool:
        """vLLM's own abort (LLMEngine.abort_request): the scheduler frees the request's blocks, its full pages
        staying cached and evictable. In flight means vLLM's client still awaits its output, so a request the
        engine-core process finished in a step this process has not read yet is aborted too (its output is
        dropped)."""
        engine = self.llm.llm_engine
        unfinished = engine.get_num_unfinished_requests()
        engine.abort_request([request_id])
        if engine.get_num_unfinished_requests() == unfinished:
            return False
        previous = self._previous.pop(request_id, [])
        latest = self._latest.pop(request_id, None) or Progress(previous, 0, False)
        self._progress[request_id] = Progress(latest.token_ids, latest.cached_tokens, True, aborted=True)
        return True

    def progress(self) -> dict[str, Progress]:
        out, self._progress = self._progress, {}
        return out

    def finish(self, requests: Optional[Sequence[Resumed]] = None) -> dict[str, Finished]:
        if requests is not None:
            self._previous.update({r.request_id: r.previous_output_token_ids for r in requests})
        done = run_to_completion(self.llm, self._previous,
                                 None if requests is None else [r.request_id for r in requests])
        for rid in done:  # finished here: gone (a Progress a step made of it is not reported again)
            self._previous.pop(rid, None)
            self._latest.pop(rid, None)
            self._progress.pop(rid, None)
        return done

    def capture(self, *, include_weights: bool = True, chains=None) -> thaw_format.Snapshot:
        return api.capture(self.llm, include_weights=include_weights, chains=chains)

    def check(self, snapshot: thaw_format.Snapshot) -> None:
        api.check_compatible(self.llm, snapshot)

    def restore(self, snapshot: thaw_format.Snapshot) -> list[Resumed]:
        resumed = api.restore(self.llm, snapshot)
        self._previous.update({r.request_id: r.previous_output_token_ids for r in resumed})
        return resumed

    def weights_changed(self, digest: Optional[str] = None) -> None:
        """The weights were changed in place (an RL step: the trainer's worker extension calling
        `model.load_weights` through `LLM.collective_rpc`), the engine idle: its identity names them by `digest`
        (thaw_format.weights_digest of the full new weights under checkpoint names; None: unknown, so snapshots
        naming a digest and captures are refused), and vLLM's prefix cache, whose KV is the old weights', is
        dropped (reset_prefix_cache). A capture with weights is refused from then on: on CPU vLLM repacks its
        linear weights, so thaw reads them back from the checkpoint, which is no longer what the engine holds."""
        api.weights_changed(self.llm, digest)

    def capture_shared(self, *, chains=None) -> str:
        """A KV-only capture published in shared memory, its pages gathered by the worker straight into its
        reused segment: "shm://<name>#<nbytes>", valid until this engine's next capture_shared. Readers in other
        processes open it with thaw_format.sdk.shared.read_shared; another engine restores it with restore_source."""
        return api.capture_shared(self.llm, chains=chains)

    def restore_source(self, source: str, *, verified: bool = False) -> list[Resumed]:
        """Restore from a source ("shm://..." or a snapshot file's path) without copying it here (api.restore_source)."""
        resumed = api.restore_source(self.llm, source, verified=verified)
        self._previous.update({r.request_id: r.previous_output_token_ids for r in resumed})
        return resumed

    def page_size(self) -> int:
        """vLLM's block size: its prefix cache holds whole blocks only (128 tokens by default on CPU)."""
        return self.llm.llm_engine.vllm_config.cache_config.block_size

    def fork(self, n: int, *, context: Sequence[int], processes: bool = False) -> list:
        return fork(self, n, context=context, processes=processes)

    # What a snapshot file may set when wake starts this engine (thaw_format.sdk.launch): the plain options an
    # equal engine needs. No class, plugin or config named by path, no token, no hub id or revision (the model is a
    # directory), no loader but those reading that directory (others fetch elsewhere, or are plugins).
    launch_options = {
        "model": LocalDirectory, "tokenizer": LocalDirectory, "dtype": str, "block_size": int, "max_model_len": int,
        "enforce_eager": bool, "kv_cache_memory_bytes": int, "gpu_memory_utilization": float, "seed": int,
        "skip_tokenizer_init": bool, "enable_prefix_caching": bool, "max_num_seqs": int,
        "max_num_batched_tokens": int, "tensor_parallel_size": int, "kv_cache_dtype": str, "quantization": str,
        "load_format": OneOf("auto", "safetensors", "pt"), "max_logprobs": int, "logprobs_mode": str,
    }

    def launch_spec(self) -> LaunchSpec:
        model, kwargs, unplain = api.launch_arguments(self.llm)
        check_launchable(api.describe(self.llm)["weights_changed"])
        return LaunchSpec(f"{__name__}:VLLMEngine.start", {"model": model, **kwargs}, unplain)

    def close(self) -> None:
        """Shut the engine down. In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) vLLM's shutdown also tears down
        process-wide state (its parallel groups) that any other in-process engine still uses: close those last."""
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
