"""Cross-engine checks: KV captured in one engine, restored into another that serves the same weights."""

from __future__ import annotations


def run_all(engine_info: dict, pythons: dict, arch: str, workdir, env: dict, timeout: int) -> list[dict]:
    return []
