"""The CLI on every engine whose virtualenv exists here (llama only, to stay within minutes), cross-engine too, and
an adapter from outside thaw (outside_driver.py, named on the command line) beside them.

One CLI run serves every test of this module. The core claims must hold for each engine: weights and KV
byte-identical after a restore in a fresh process, the engine's own cache-hit count, token-identical greedy
continuation, a request captured in flight finishing as in the parent, corrupt snapshots and another model's
refused, and the KV control; across engines, a ring (each engine's snapshot restored into the next, the last's
into the first: every engine once a source and once a target) with its KV bytes, a cache hit and KV close to
the target's own. The rest of the matrix is the receipt's to show (conformance/README.md's commands): every
ordered pair, and the fork and sleep/wake checks, which start engines of their own and which each engine's
tests prove on it (tests/*/test_sleep.py, test_fork*.py, test_pool.py). The outside driver, last in the ring,
runs every check, fork and sleep/wake included (its children must be its own class).
"""

import os

import pytest

from conftest import REPO
from thaw_conformance.receipt import passed
from thaw_conformance.results import CHECKS

ENGINES = {"mlx": ".venv", "vllm": ".venv-vllm", "sglang": ".venv-sglang", "transformers": ".venv"}
CORE = ("weights_identical", "kv_identical", "prefix_hit_fresh_process", "continuation_greedy", "streaming",
        "mid_stream_resume", "corrupt_refused", "wrong_model_refused", "kv_control")
PRESENT = [e for e, venv in ENGINES.items() if (REPO / venv / "bin" / "python").exists()]
OUTSIDE = "outside=outside_driver:driver"
RING = PRESENT + ["outside"]


def _absent(reason: str):
    """Skip a test for an engine environment missing here; fail it under THAW_REQUIRE_ENGINES=1."""
    if os.environ.get("THAW_REQUIRE_ENGINES") == "1":
        pytest.fail(f"THAW_REQUIRE_ENGINES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _needs_a_built_in_engine():
    if not PRESENT:
        _absent("no built-in engine's environment here to cross the outside driver with")


@pytest.fixture(scope="module")
def receipt(run_cli):
    """The ring run; with no engine environment here, the outside driver alone, in this interpreter."""
    return run_cli("--engine", *RING, "--driver", OUTSIDE, "--arch", "llama", "--cross-arch", "llama",
                   "--cross-ring", "--fork-arch", "none", "--engine-fork-arch", "outside=llama", "--no-vectors",
                   timeout=3000)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_core_claims_hold(engine, receipt):
    if engine not in PRESENT:
        _absent(f"{ENGINES[engine]} does not exist here")
    _, made, markdown = receipt
    rows = {r["check"]: r for r in made["results"] if r["engine"] == engine and r["arch"] == "llama"}
    assert made["engines"][engine]["status"].startswith("ran"), made["engines"][engine]
    bad = {check: f"{rows[check]['status']}: {rows[check]['detail']}" for check in CORE
           if rows[check]["status"] != "passed"}
    assert not bad
    assert f"| {engine} | llama |" in markdown


def test_the_exit_status_says_whether_anything_failed(receipt):
    # Not 0 alone: test_core_claims_hold tolerates an engine's failures outside the core claims.
    status, made, _ = receipt
    assert status == (0 if passed(made) else 1), status


def test_an_outside_driver_is_checked_and_crosses_with_the_built_in_engines(receipt):
    _, made, markdown = receipt
    rows = {r["check"]: r for r in made["results"] if r["engine"] == "outside"}
    assert {c: r["status"] for c, r in rows.items()} == {c: "passed" for c in CHECKS}
    assert made["engines"]["outside"]["driver"] == OUTSIDE.partition("=")[2]
    assert "| outside | llama |" in markdown
    _needs_a_built_in_engine()
    crossed = {(r["engine"], r["check"]): r["status"] for r in made["cross_engine"]}
    for pair in (f"{RING[-2]}->outside", f"outside->{RING[0]}"):  # a built-in engine's snapshot in, its own out
        assert crossed[pair, "cross_restore"] == crossed[pair, "cross_kv_lands"] == "passed", crossed
        assert crossed[pair, "cross_continuation"] in ("passed", "differs"), crossed


def _ring(engines: list) -> set:
    """--cross-ring's pairs: each engine into the next, the last into the first (two engines: both ways)."""
    return {f"{a}->{b}" for a, b in zip(engines, engines[1:] + engines[:1])}


def test_cross_engine_pairs_are_reported(receipt):
    _needs_a_built_in_engine()
    _, made, _ = receipt
    pairs = {r["engine"] for r in made["cross_engine"]}
    assert pairs == _ring(RING)
    assert all(r["status"] in ("passed", "failed", "differs", "skipped", "error") for r in made["cross_engine"])


def test_snapshots_cross_between_engines(receipt):
    _needs_a_built_in_engine()
    _, made, _ = receipt
    rows = {(r["engine"], r["check"]): r for r in made["cross_engine"]}
    # Every engine names a checkpoint's model alike (spec 5.1), so each one's snapshot must land in the next.
    for pair in sorted(_ring(RING)):
        for check in ("cross_restore", "cross_kv_lands", "cross_prefix_hit"):
            assert rows[pair, check]["status"] == "passed", (pair, check, rows[pair, check]["detail"])
        # Other kernels may continue differently ("differs"), but the restored KV must be close to the target's.
        assert rows[pair, "cross_continuation"]["status"] in ("passed", "differs"), rows[pair, "cross_continuation"]
