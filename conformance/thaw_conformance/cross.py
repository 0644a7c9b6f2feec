"""Cross-engine checks: KV captured in one engine, restored into another engine serving the same checkpoint.

For each ordered pair of engines that ran and each architecture in `--cross-arch`, a process of the target's
Python (`worker --phase cross`) first lets the target prefill the source's context itself, then restores the
source's snapshot and reads the KV back through the target's adapter: it must be the source's bytes, now in
the target's own layout. The target's continuation from the restored KV is reported against the one from its
own prefill: identical, or "differs" (other kernels can compute other bits; thaw moves bytes, it cannot make
two engines' arithmetic agree).
"""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import thaw_format

from .compare import kv_diff
from .results import CheckFailed, Recorder
from .runner import PARENT_RECORD
from .sdk import GREEDY, Driver, Workload

CROSS_CHECKS = {
    "cross_restore": "the target accepts the source's snapshot (same checkpoint) or names why not",
    "cross_kv_lands": "KV read back through the target's adapter is the source's bytes, page for page",
    "cross_prefix_hit": "the target reports the restored tokens as cached (> 0)",
    "cross_continuation": "greedy continuation from the restored KV vs. from the target's own prefill",
}
# Engines whose snapshots can meet: they serve the zoo's HF checkpoints (the template has its own toy model).
CHECKPOINT_ENGINES = ("mlx", "vllm", "sglang")


def cross_phase(driver: Driver, arch: str, source_dir: Path, workload: Workload, recorder: Recorder) -> None:
    """Run in the target's process: own prefill, then restore the source's snapshot, compare."""
    record = json.loads((source_dir / PARENT_RECORD).read_text())
    snapshot_path = Path(record["snapshot"])
    prompt = workload.prompt + record["first"]
    engine = driver.start(arch, source_dir)
    try:
        own = engine.generate(prompt, workload.continue_tokens, GREEDY)
        with recorder.check("cross_restore") as note:
            try:
                engine.restore(snapshot_path)
            except thaw_format.SnapshotError as exc:  # a clean refusal: the engines disagree on the model
                raise CheckFailed(f"refused: {type(exc).__name__}: {exc}") from exc
            note(f"restored {snapshot_path.name} of {thaw_format.load(snapshot_path).engine.name}")
        if recorder.results[-1].status != "passed":
            recorder.missing("skipped", "the target did not restore the source's snapshot", CROSS_CHECKS)
            return
        with recorder.check("cross_kv_lands") as note:
            source = thaw_format.load(snapshot_path)
            diff = kv_diff(source, engine.kv())
            if diff:
                raise CheckFailed(diff)
            note(f"{source.kv.num_pages} pages byte-identical in the target")
        restored = engine.generate(prompt, workload.continue_tokens, GREEDY)
        with recorder.check("cross_prefix_hit") as note:
            if restored.cached_tokens <= 0:
                raise CheckFailed("the target reports no cached tokens after the restore")
            note(f"{restored.cached_tokens} of {len(prompt)} tokens cached")
        same = restored.token_ids == own.token_ids
        recorder.add("cross_continuation", "passed" if same else "differs",
                     f"restored {restored.token_ids} vs own prefill {own.token_ids}; the source continued "
                     f"{record['continuations']['greedy']['tokens']}")
    finally:
        engine.close()


def run_all(engines: dict, pythons: dict, archs: list[str], workdir: Path, env: dict, timeout: int) -> list[dict]:
    """Every ordered pair of checkpoint engines that ran, for each architecture both captured."""
    ran = [e for e in CHECKPOINT_ENGINES if "versions" in engines.get(e, {})]  # its worker reported results
    results = []
    for source, target in itertools.permutations(ran, 2):
        for arch in archs:
            source_dir = workdir / source / arch
            if not (source_dir / PARENT_RECORD).exists():
                continue
            out = workdir / "cross" / f"{source}-{target}-{arch}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            results += _run_one(pythons[target], target, arch, source_dir, out, env, timeout, f"{source}->{target}")
    return results


def _run_one(python: Path, target: str, arch: str, source_dir: Path, out: Path, env: dict, timeout: int,
             label: str) -> list[dict]:
    command = [str(python), "-m", "thaw_conformance.worker", "--phase", "cross", "--driver", target, "--arch", arch,
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
