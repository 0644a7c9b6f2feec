"""An adapter outside thaw, named on the command line, runs every check and crosses with a built-in engine."""

from thaw_conformance.results import CHECKS


def test_an_outside_driver_is_checked_and_crosses_with_the_built_in_engines(run_cli):
    status, made, markdown = run_cli("--engine", "outside", "transformers", "--driver", "outside=outside_driver:driver",
                                     "--arch", "llama", "--fork-arch", "llama", "--cross-arch", "llama",
                                     "--no-vectors", timeout=1500)
    rows = {r["check"]: r for r in made["results"] if r["engine"] == "outside"}
    assert {c: r["status"] for c, r in rows.items()} == {c: "passed" for c in CHECKS}
    assert made["engines"]["outside"]["driver"] == "outside=outside_driver:driver".partition("=")[2]
    crossed = {(r["engine"], r["check"]): r["status"] for r in made["cross_engine"]}
    for pair in ("outside->transformers", "transformers->outside"):
        assert crossed[pair, "cross_restore"] == crossed[pair, "cross_kv_lands"] == "passed", crossed
        assert crossed[pair, "cross_continuation"] in ("passed", "differs"), crossed
    assert status == 0 and "| outside | llama |" in markdown
