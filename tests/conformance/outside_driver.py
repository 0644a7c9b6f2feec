"""A driver from outside thaw's own (`--driver outside=outside_driver:driver`), as an engine author writes one: a
contract engine under its own name, here thaw_transformers' class renamed, serving the zoo's checkpoints."""

from __future__ import annotations

from pathlib import Path

from thaw_conformance.models import ARCHS, checkpoint
from thaw_format.sdk import LaunchSpec
from thaw_transformers import TransformersEngine


class OutsideEngine(TransformersEngine):
    name = "outside"

    def launch_spec(self) -> LaunchSpec:  # fork children are this class too
        return LaunchSpec(f"{__name__}:OutsideEngine.start", super().launch_spec().kwargs)


class OutsideDriver:
    name = "outside"
    zoo_checkpoints = True

    def versions(self) -> dict[str, str]:
        return {"outside": "1"}

    def architectures(self) -> list[str]:
        return list(ARCHS)

    def start(self, arch: str, workdir: Path) -> OutsideEngine:
        return OutsideEngine.start(str(checkpoint(arch)))


def driver() -> OutsideDriver:
    return OutsideDriver()
