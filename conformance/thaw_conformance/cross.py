"""Cross-engine checks: KV captured in one engine, restored into another engine serving the same checkpoint.

For each ordered pair of engines that ran and each architecture in `--cross-arch`, a process of the target's
Python (`worker --phase cross`) first lets the target prefill the source's context itself, then restores the
source's snapshot and reads the KV back through the target's adapter: it must be the source's bytes, now in
the target's own layout, and numerically close to the KV the target computed itself for the same tokens (other
kernels round differently; a page, head or position out of place does not come close). The target's
continuation from the restored KV is reported against the one from its own prefill: identical, or "differs"
(other kernels can compute other bits; thaw moves bytes, it cannot make two engines' arithmetic agree).
"""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import thaw_format

from .compare import kv_closeness, kv_diff, pages_by_prefix
from .results import CheckFailed, Recorder
from .runner import PARENT_RECORD
from .sdk import Driver, Workload, greedy

CROSS_CHECKS = {
    "cross_restore": "the target accepts the source's snapshot (same checkpoint) or names why not",
    "cross_kv_lands": "KV read back through the target's adapter is the source's bytes, page for page (a partial "
                      "last page may be left out by a target that caches whole pages only)",
    "cross_prefix_hit": "the target reports the restored tokens as cached (> 0)",
    "cross_continuation": "the restored KV is close to the target's own prefill KV of the same tokens (fails if "
                          "not); greedy continuation from it vs. from the own prefill (differs: reported)",
}
# How far the restored KV may be from the target's own KV of the same tokens, relative to the largest |KV| value.
# Two engines' fp32 kernels (matmul blocking, RoPE, norms) differ in rounding only: on the zoo's llama and qwen2
# the pairs of MLX, vLLM and SGLang measured max |diff| 3.5e-6 to 6.6e-6 with |KV| up to 4.5-4.9, at most 1.5e-6
# of it. On gemma2, SGLang's own arithmetic is further from MLX's and vLLM's (which agree within 8e-6): 9.6e-3
# with |KV| up to 4.7, 2.0e-3 of it, in both directions and in its own prefill alike. A layout fault (a page,
# head or position out of place, K and V swapped) puts unrelated values side by side: differences of the order
# of |KV| itself. 1e-2 lies five times above the largest arithmetic difference seen and decades below a fault.
# (A tolerance for the zoo's fp32 checkpoints: bf16 KV rounds at 4e-3 of a value and needs one of its own.)
KV_TOLERANCE = 1e-2


def cross_phase(driver: Driver, arch: str, source_dir: Path, workload: Workload, recorder: Recorder) -> None:
    """Run in the target's process: own prefill, then restore the source's snapshot, compare."""
    record = json.loads((source_dir / PARENT_RECORD).read_text())
    snapshot_path = Path(record["snapshot"])
    prompt = workload.prompt + record["first"]
    engine = driver.start(arch, source_dir)
    try:
        own = engine.generate(prompt, greedy(workload.continue_tokens))
        # the target's own KV of the text: what the restored pages are measured against
        own_kv = engine.capture(include_weights=False)
        with recorder.check("cross_restore") as note:
            try:
                engine.restore(thaw_format.load(snapshot_path))
            except thaw_format.SnapshotError as exc:  # a clean refusal: the engines disagree on the model
                raise CheckFailed(f"refused: {type(exc).__name__}: {exc}") from exc
            note(f"restored {snapshot_path.name} of {thaw_format.load(snapshot_path).engine.name}")
        if recorder.results[-1].status != "passed":
            recorder.missing("skipped", "the target did not restore the source's snapshot", CROSS_CHECKS)
            return
        landed = engine.capture(include_weights=False)
        with recorder.check("cross_kv_lands") as note:
            source = thaw_format.load(snapshot_path)
            diff = kv_diff(source, landed, full_pages_only=True)
            if diff:
                raise CheckFailed(diff)
            held = len(pages_by_prefix(source).keys() & pages_by_prefix(landed).keys())
            note(f"{held} of {source.kv.num_pages} pages byte-identical in the target")
            if held < source.kv.num_pages:
                note("the partial last page is not held: the target caches whole pages only, and computes those "
                     "tokens again")
        restored = engine.generate(prompt, greedy(workload.continue_tokens))
        with recorder.check("cross_prefix_hit") as note:
            if restored.cached_tokens <= 0:
                raise CheckFailed("the target reports no cached tokens after the restore")
            note(f"{restored.cached_tokens} of {len(prompt)} tokens cached")
        _continuation(recorder, own_kv, landed, own.token_ids, restored.token_ids,
                      record["continuations"]["greedy"]["tokens"])
    finally:
        engine.close()


def _continuation(recorder: Recorder, own_kv, landed, own: list, restored: list, source: list) -> None:
    """Fails when the restored KV is not numerically the target's own KV of the same tokens (a layout fault:
    pages, heads or positions out of place); otherwise the continuations are compared and reported."""
    tokens, diff, scale = kv_closeness(own_kv, landed)
    detail = (f"restored KV vs the target's own prefill: max abs diff {diff:.3g} over {tokens} tokens (KV values "
              f"up to {scale:.3g} in magnitude); continuation restored {restored} vs own prefill {own}; the source "
              f"continued {source}")
    if tokens == 0:
        recorder.add("cross_continuation", "failed", f"no token's KV in common with the target's own prefill; {detail}")
    elif diff > KV_TOLERANCE * scale:
        recorder.add("cross_continuation", "failed",
                     f"restored KV differs beyond {KV_TOLERANCE:g} x the largest KV value: {detail}")
    else:
        recorder.add("cross_continuation", "passed" if restored == own else "differs", detail)


def pairs(ran: list[str], ring: bool = False) -> list[tuple[str, str]]:
    """(source, target) pairs: every ordered pair, or with `ring` each engine into the next and the last into the
    first, so each engine is once a source and once a target (n target starts instead of n(n-1))."""
    if ring and len(ran) > 2:  # two engines' ring is both their ordered pairs
        return [(e, ran[(i + 1) % len(ran)]) for i, e in enumerate(ran)]
    return list(itertools.permutations(ran, 2))


def run_all(engines: dict, pythons: dict, archs: list[str], workdir: Path, env: dict, timeout: int,
            ring: bool = False) -> list[dict]:
    """The pairs (`pairs`) of engines that ran and serve the zoo's checkpoints (their drivers' `zoo_checkpoints`:
    the template has a toy model of its own), for each architecture both captured."""
    ran = [e for e, info in engines.items() if info.get("zoo_checkpoints")]  # its worker reported results
    results = []
    for source, target in pairs(ran, ring):
        for arch in archs:
            source_dir = workdir / source / arch
            record = source_dir / PARENT_RECORD
            if not record.exists() or "snapshot" not in json.loads(record.read_text()):  # no capture to cross
                continue
            out = workdir / "cross" / f"{source}-{target}-{arch}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            results += _run_one(pythons[target], engines[target]["driver"], arch, source_dir, out, env, timeout,
                                f"{source}->{target}")
    return results


def _run_one(python: Path, driver: str, arch: str, source_dir: Path, out: Path, env: dict, timeout: int,
             label: str) -> list[dict]:
    command = [str(python), "-m", "thaw_conformance.worker", "--phase", "cross", "--driver", driver, "--arch", arch,
               "--workdir", str(source_dir), "--out", str(out)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        failure = None if done.returncode == 0 and out.exists() else \
            f"exited {done.returncode}: {' | '.join(done.stderr.strip().splitlines()[-3:])}"
    except subprocess.TimeoutExpired:
        failure = f"timed out after {timeout} s"
    if failure:
        recorder = Recorder(label, arch)
        recorder.missing("error", f"the cross-engine worker {failure}", CROSS_CHECKS)
        return [r.to_json() for r in recorder.results]
    results = json.loads(out.read_text())["results"]
    for r in results:
        r["engine"] = label
    return results
