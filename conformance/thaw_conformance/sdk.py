"""What a conformance driver gives the suite: engine start-up. The engine itself is the adapter's contract
engine (thaw_format.sdk.contract, re-exported here), which the suite drives directly:

    engine = driver.start(arch, workdir)             # a fresh contract engine serving a zoo model, in this process
    engine.generate(prompt_ids, greedy(n))           # -> Generation
    thaw_format.save(engine.capture(), path)         # weights, cached KV, requests in flight
    engine.restore(thaw_format.load(path))           # -> list[Resumed]
    engine.capture(include_weights=True).weights     # the live weights; include_weights=False: the live KV
    engine.submit(...) / step() / finish()           # requests in flight ("mid_stream")
    engine.fork(n, context=..., processes=True)      # children in other processes ("fork_processes")
    engine.close()

What the engine can do beyond the core comes from `type(engine).capabilities()`: a check needing a missing
capability is reported "not supported by the adapter", never passed. `start` raising Unsupported marks every
check of that architecture so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

from thaw_format.sdk import CAPABILITIES, Engine, Generation, Resumed, Unsupported, greedy, seeded

__all__ = ["CAPABILITIES", "Driver", "Engine", "Generation", "Resumed", "Unsupported", "Workload", "greedy", "seeded"]


@runtime_checkable
class Driver(Protocol):
    name: str  # the engine's name in the receipt: "vllm", "mlx", ...
    # Optional, False if absent: True when `start` serves `models.checkpoint(arch)`, the zoo's Hugging Face files,
    # so that this engine's snapshots and every other such engine's are restored into each other (cross.py).
    zoo_checkpoints: bool

    def versions(self) -> dict[str, str]:
        """Versions worth a receipt line: the engine, its framework, the adapter."""

    def architectures(self) -> list[str]:
        """Zoo architecture names this driver can start, in receipt order."""

    def start(self, arch: str, workdir: Path) -> Engine:
        """A fresh contract engine serving the tiny seeded model of `arch`; workdir is for model files and scratch.
        Raises Unsupported for an architecture the adapter cannot serve."""


@dataclass
class Workload:
    """The prompts and lengths every check uses, the same for every engine so that receipts compare."""

    prompt: list[int] = field(default_factory=lambda: [(7 * i + 3) % 200 + 3 for i in range(70)])
    first_tokens: int = 6  # generated before the snapshot
    continue_tokens: int = 8  # generated after it, by parent and child alike
    mid_stream_tokens: int = 12  # total length of the in-flight request
    mid_stream_after: int = 5  # steps taken before the in-flight capture
    fork_n: int = 2
    fork_archs: Optional[tuple] = None  # architectures the fork check runs on (None: all); forks cost engine starts
    seed: int = 1234
