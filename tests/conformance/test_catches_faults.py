"""The suite is only worth its receipt if it fails wrong adapters: one fault each, each caught by its check."""

import pytest

from thaw_conformance.results import CHECKS


def statuses(results) -> dict:
    return {check: r["status"] for (_, check), r in results.items()}


def test_zero_kv_is_caught(run_worker):
    got = statuses(run_worker("broken_drivers:zero_kv"))
    assert got["kv_identical"] == "failed" and got["continuation_greedy"] == "failed"


def test_recomputing_instead_of_restoring_is_caught_by_the_control(run_worker):
    got = statuses(run_worker("broken_drivers:recomputes"))
    assert got["kv_control"] == "failed"


def test_dropped_rng_state_is_caught(run_worker):
    got = statuses(run_worker("broken_drivers:drops_rng"))
    assert got["mid_stream_resume_seeded"] == "failed"
    assert got["mid_stream_resume"] == got["continuation_seeded"] == "passed"


def test_missing_model_check_is_caught(run_worker):
    results = run_worker("broken_drivers:no_model_check")
    assert statuses(results)["wrong_model_refused"] == "failed"
    assert "restored without an error" in results["toy", "wrong_model_refused"]["detail"]


def test_unsupported_features_are_never_passed(run_worker):
    results = run_worker("broken_drivers:no_kv_readback")
    got = statuses(results)
    for check in ("kv_identical", "logprobs_identical", "fork_n", "mid_stream_resume", "mid_stream_resume_seeded"):
        assert got[check] == "unsupported", check
        assert results["toy", check]["detail"].startswith("not supported by the adapter"), check
    assert got["continuation_greedy"] == got["weights_identical"] == "passed"
    assert set(got) == set(CHECKS)


def test_an_architecture_the_adapter_cannot_start_is_unsupported_in_every_check(run_worker):
    results = run_worker("broken_drivers:cannot_start")
    assert set(statuses(results)) == set(CHECKS) and set(statuses(results).values()) == {"unsupported"}
    assert all(r["detail"] == "not supported by the adapter: no toy here: the adapter lacks this model's cache "
               "layout" for r in results.values())


@pytest.mark.parametrize("arch", ["nonexistent"])
def test_unknown_arch_is_skipped(run_worker, arch):
    got = statuses(run_worker("template", arch))
    assert set(got.values()) == {"skipped"}
