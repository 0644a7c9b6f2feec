"""thaw_vllm.LLM: a drop-in vllm.LLM that can snapshot, restore and fork itself."""

from __future__ import annotations

import vllm

from . import api, rpc


class LLM(vllm.LLM):
    def __init__(self, model: str, **kwargs) -> None:
        self.thaw_model = str(model)  # the model directory, as given
        self.thaw_context = None
        super().__init__(model=str(model), **api.engine_args(**kwargs))

    def collective_rpc(self, method, *args, **kwargs):
        """vllm.LLM.collective_rpc; thaw_describe (the model identity and KV layout) is asked of the worker until
        every rank has answered it without an error (rpc.as_data: a transient one, a worker short of memory, is
        asked again), then kept, not asked on every restore's compatibility check, until thaw_weights_changed
        (api.weights_changed) changes the identity."""
        if method == "thaw_weights_changed":
            self._thaw_described = None
        if method != "thaw_describe":
            return super().collective_rpc(method, *args, **kwargs)
        if getattr(self, "_thaw_described", None) is None:
            replies = super().collective_rpc(method, *args, **kwargs)
            if any(rpc.is_error(reply) for reply in replies):
                return replies
            self._thaw_described = replies
        return self._thaw_described

    def generate(self, prompts, *args, **kwargs):
        """vllm.LLM.generate; a single token-id prompt becomes the context fork() continues by default."""
        single = prompts[0] if isinstance(prompts, (list, tuple)) and len(prompts) == 1 else prompts
        if isinstance(single, dict) and "prompt_token_ids" in single:
            self.thaw_context = list(single["prompt_token_ids"])
        return super().generate(prompts, *args, **kwargs)

    def snapshot(self, **kwargs):
        return api.capture(self, **kwargs)

    def restore(self, snapshot):
        return api.restore(self, snapshot)

    def weights_changed(self, digest=None) -> None:
        """Call after loading new weights in place (an RL step): api.weights_changed."""
        api.weights_changed(self, digest)

    def fork(self, n: int, **kwargs):
        from .fork import fork

        return fork(self, n, **kwargs)
