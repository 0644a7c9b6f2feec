"""The receipt: every check's result with the machine and versions it ran on, as JSON and as a markdown table."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from . import machine
from .cross import CROSS_CHECKS
from .results import CHECKS, STATUSES
from .vectors import VECTOR_CHECKS

RECEIPT_VERSION = 1
CELL = {"passed": "pass", "failed": "**FAIL**", "unsupported": "n/s", "skipped": "skip", "error": "**ERR**",
        "differs": "differs"}
SHORT = {
    "weights_identical": "weights", "kv_identical": "KV", "prefix_hit_fresh_process": "prefix hit",
    "continuation_greedy": "greedy", "continuation_seeded": "seeded", "logprobs_identical": "logprobs",
    "fork_n": "fork n", "streaming": "streaming", "mid_stream_resume": "mid-stream",
    "mid_stream_resume_seeded": "mid-stream seeded",
    "corrupt_refused": "corrupt", "wrong_model_refused": "wrong model", "kv_control": "KV control",
    "sleep_wake": "sleep/wake",
}


def build(command: str, engines: dict, results: list[dict], timings: dict, cross: list[dict] = ()) -> dict:
    everything = list(results) + list(cross)
    return {
        "receipt_version": RECEIPT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine.describe(),
        "engines": engines,
        "checks": {**CHECKS, **VECTOR_CHECKS, **CROSS_CHECKS},
        "results": list(results),
        "cross_engine": list(cross),
        "timings": timings,
        "summary": {s: n for s, n in Counter(r["status"] for r in everything).items()},
    }


def passed(receipt: dict) -> bool:
    """True when nothing failed or errored (unsupported and skipped checks are listed, not hidden)."""
    return not any(r["status"] in ("failed", "error") for r in receipt["results"] + receipt["cross_engine"])


def write(receipt: dict, json_path: Path) -> Path:
    """Write receipt.json and, beside it, receipt.md; returns the markdown path."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(receipt, indent=1) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(receipt))
    return md_path


def markdown(receipt: dict) -> str:
    m = receipt["machine"]
    gpus = ", ".join(f"{g['name']} (driver {g['driver']})" for g in m["gpus"]) or "no GPU"
    memory = f"{m['memory_bytes'] / 2**30:.0f} GiB" if m["memory_bytes"] else "unknown memory"
    thaw = m["thaw"]
    lines = [
        "# thaw conformance receipt", "",
        f"- command: `{receipt['command']}`",
        f"- created: {receipt['created']}",
        f"- machine: {m['cpu']['model']}, {m['cpu']['cores']} cores, {memory}, {gpus}; {m['os']['release'] or m['os']['platform']}",
        f"- thaw {thaw['version']} (format {'.'.join(map(str, thaw['format']))}), "
        + (f"commit {thaw['git_commit']}" if thaw.get("git_commit") else "an installed package (no checkout)")
        + (" + uncommitted changes" if thaw.get("git_uncommitted_changes") else ""),
    ]
    for name, engine in receipt["engines"].items():
        versions = ", ".join(f"{k} {v}" for k, v in engine.get("versions", {}).items())
        lines.append(f"- {name}: {engine['status']}" + (f"; {versions}; Python {engine['python']}" if versions else ""))
    counts = ", ".join(f"{receipt['summary'].get(status, 0)} {status}" for status in STATUSES)
    lines.append(f"- summary: {counts}")
    engine_rows = [r for r in receipt["results"] if r["engine"] != "format"]
    lines += ["", _table(engine_rows, list(CHECKS), ("engine", "arch"), SHORT)]
    vector_rows = [r for r in receipt["results"] if r["engine"] == "format"]
    if vector_rows:
        lines += ["", "Format conformance (spec/vectors):", "", _table(vector_rows, list(VECTOR_CHECKS), ("arch",),
                                                                        {"vector_read": "read", "vector_rewrite": "rewrite"},
                                                                        ("vector",))]
    if receipt["cross_engine"]:
        lines += ["", "Cross-engine (KV captured in one engine, restored into another):", ""]
        lines += ["| from | to | arch | check | result | detail |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['engine'].split('->')[0]} | {r['engine'].split('->')[1]} | {r['arch']} | {r['check']} | "
                  f"{CELL[r['status']]} | {_cell_text(r['detail'])} |" for r in receipt["cross_engine"]]
    notable = [r for r in receipt["results"] + receipt["cross_engine"]
               if r["status"] in ("failed", "error", "unsupported", "skipped")]
    if notable:
        lines += ["", "Not passed:", ""]
        lines += [f"- {r['engine']}/{r['arch']} {r['check']}: {r['status']}: {r['detail']}" for r in notable]
    lines += ["", "pass: byte/token identical as the check states; n/s: not supported by the adapter (never counted "
              "as passed); skip: not run here; FAIL/ERR: wrong result / crashed; differs: a reported cross-engine "
              "comparison. Checks: "
              + "; ".join(f"{SHORT[k]}: {v}" for k, v in CHECKS.items()) + "."]
    return "\n".join(lines) + "\n"


def _table(rows: list[dict], checks: list[str], keys: tuple, short: dict, labels: tuple = ()) -> str:
    grid: dict[tuple, dict] = {}
    for r in rows:
        grid.setdefault(tuple(r[k] for k in keys), {})[r["check"]] = r["status"]
    head = "| " + " | ".join((labels or keys) + tuple(short[c] for c in checks)) + " |"
    rule = "|" + "---|" * (len(keys) + len(checks))
    body = ["| " + " | ".join(list(key) + [CELL.get(cells.get(c), "") for c in checks]) + " |"
            for key, cells in grid.items()]
    return "\n".join([head, rule] + body)


def _cell_text(text: str) -> str:
    return text.replace("|", "/")[:160]
