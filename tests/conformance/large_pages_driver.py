"""The template's engine with pages of 128 tokens, longer than the 70 of the sleep check's trunk at 32: the check
must grow its trunk to two of the engine's pages and a partial one, and test the engine rather than fail it."""

from __future__ import annotations

import dataclasses

from thaw_conformance.template.adapter import ToyThawEngine
from thaw_conformance.template.driver import ARCHITECTURES, ToyDriver
from thaw_conformance.template.engine import ToyEngine, ToyModelConfig, make_weights

PAGE_SIZE = 128


class LargePages(ToyThawEngine):
    @classmethod
    def start(cls, **config) -> "LargePages":
        model = ToyModelConfig(**config)
        return cls(ToyEngine(model, make_weights(model), page_size=PAGE_SIZE))

    def launch_spec(self):
        spec = super().launch_spec()
        return type(spec)(f"{__name__}:LargePages.start", spec.kwargs)  # woken with its own pages


class LargePagesDriver(ToyDriver):
    name = "large-pages"

    def start(self, arch, workdir) -> LargePages:
        return LargePages.start(**dataclasses.asdict(ARCHITECTURES[arch]))


def driver() -> LargePagesDriver:
    return LargePagesDriver()
