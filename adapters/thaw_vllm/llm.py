"""thaw_vllm.LLM: a drop-in vllm.LLM that can snapshot, restore and fork itself."""

from __future__ import annotations

import vllm

from . import api


class LLM(vllm.LLM):
    def __init__(self, model: str, **kwargs) -> None:
        # Plain construction arguments, so that fork() can start identical engines in other processes.
        self.thaw_engine_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))}
        self.thaw_model = str(model)
        super().__init__(model=str(model), **api.engine_args(**kwargs))

    def snapshot(self, **kwargs):
        return api.capture(self, **kwargs)

    def restore(self, snapshot):
        return api.restore(self, snapshot)

    def fork(self, n: int, **kwargs):
        from .fork import fork

        return fork(self, n, **kwargs)
