"""The CLI on every engine whose virtualenv exists here (llama only, to stay within minutes), cross-engine too.

One CLI run serves every test of this module. The core claims must hold for each engine: weights and KV
byte-identical after a restore in a fresh process, the engine's own cache-hit count, token-identical greedy
continuation, corrupt snapshots refused, and the KV control. The rest of the matrix is the receipt's to show.
"""

import os

import pytest

from conftest import REPO

ENGINES = {"mlx": ".venv", "vllm": ".venv-vllm", "sglang": ".venv-sglang"}
CORE = ("weights_identical", "kv_identical", "prefix_hit_fresh_process", "continuation_greedy", "corrupt_refused",
        "kv_control")
PRESENT = [e for e, venv in ENGINES.items() if (REPO / venv / "bin" / "python").exists()]


@pytest.fixture(scope="module")
def receipt(run_cli):
    if not PRESENT:
        pytest.skip("no engine environment here (scripts/setup-core.sh, setup-vllm.sh, setup-sglang.sh make them)")
    _, made, markdown = run_cli("--engine", *PRESENT, "--arch", "llama", "--cross-arch", "llama", "--no-vectors",
                                timeout=3000)
    return made, markdown


@pytest.mark.parametrize("engine", list(ENGINES))
def test_core_claims_hold(engine, receipt):
    if engine not in PRESENT:
        reason = f"{ENGINES[engine]} does not exist here"
        if os.environ.get("THAW_REQUIRE_ENGINES") == "1":
            pytest.fail(f"THAW_REQUIRE_ENGINES=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    made, markdown = receipt
    rows = {r["check"]: r for r in made["results"] if r["engine"] == engine and r["arch"] == "llama"}
    assert made["engines"][engine]["status"].startswith("ran"), made["engines"][engine]
    bad = {check: f"{rows[check]['status']}: {rows[check]['detail']}" for check in CORE
           if rows[check]["status"] != "passed"}
    assert not bad
    assert f"| {engine} | llama |" in markdown


def test_cross_engine_pairs_are_reported(receipt):
    made, _ = receipt
    if len(PRESENT) < 2:
        pytest.skip("cross-engine checks need two engines")
    pairs = {r["engine"] for r in made["cross_engine"]}
    assert pairs == {f"{a}->{b}" for a in PRESENT for b in PRESENT if a != b}
    assert all(r["status"] in ("passed", "failed", "differs", "skipped", "error") for r in made["cross_engine"])
