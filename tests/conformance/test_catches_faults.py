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


def test_a_sleep_that_loses_a_request_in_flight_is_caught(run_worker):
    results = run_worker("broken_drivers:holds_one_request")
    assert statuses(results)["sleep_wake"] == "failed" and statuses(results)["mid_stream_resume"] == "passed"
    assert "resumed 1 requests, not the 2 in flight at sleep" in results["toy", "sleep_wake"]["detail"]


def test_a_sleep_check_that_cannot_see_restored_pages_fails(run_worker):
    """A woken engine whose pages are longer than the trunk the sleeper's were sized for: its cached-token count
    proves nothing, so not passed."""
    results = run_worker("broken_drivers:wakes_saying_large_pages")
    assert statuses(results)["sleep_wake"] == "failed"
    assert "(128 tokens) is longer than the 70-token trunk" in results["toy", "sleep_wake"]["detail"]


def test_a_contract_rule_broken_only_by_sleep_fails_the_sleep_check(run_worker):
    results = run_worker("broken_drivers:busy_ids_not_str")
    assert statuses(results)["sleep_wake"] == "failed" and statuses(results)["continuation_greedy"] == "passed"
    assert "submit() returned int" in results["toy", "sleep_wake"]["detail"]


def test_a_minimal_adapter_is_unsupported_by_the_sleep_check(run_worker):
    results = run_worker("broken_drivers:minimal")
    assert statuses(results)["sleep_wake"] == "unsupported"
    assert "needs 'mid_stream'" in results["toy", "sleep_wake"]["detail"]


def test_an_engine_whose_close_failed_in_sleep_is_not_closed_again(run_worker):
    results = run_worker("broken_drivers:close_fails_in_flight")
    assert statuses(results)["sleep_wake"] == "error" and statuses(results)["continuation_greedy"] == "passed"
    assert "close failed with requests in flight" in results["toy", "sleep_wake"]["detail"]


def test_missing_model_check_is_caught(run_worker):
    results = run_worker("broken_drivers:no_model_check")
    assert statuses(results)["wrong_model_refused"] == "failed"
    assert "restore restored it without an error" in results["toy", "wrong_model_refused"]["detail"]


def test_a_restore_that_changes_the_engine_before_refusing_is_caught(run_worker):
    results = run_worker("broken_drivers:clears_before_refusing")
    assert statuses(results)["wrong_model_refused"] == "failed"
    assert "a refused restore changed the engine" in results["toy", "wrong_model_refused"]["detail"]


def test_a_restore_source_that_reads_a_file_unchecked_is_caught(run_worker):
    results = run_worker("broken_drivers:source_unchecked")
    assert statuses(results)["corrupt_refused"] == "failed"
    assert results["toy", "corrupt_refused"]["detail"] == \
        "one flipped data byte: restore_source restored it without an error"


def test_a_check_that_accepts_a_wrong_model_is_caught(run_worker):
    results = run_worker("broken_drivers:check_accepts_all")
    assert statuses(results)["wrong_model_refused"] == "failed"
    assert "check accepted it without an error" in results["toy", "wrong_model_refused"]["detail"]


@pytest.mark.parametrize("spec, rule", [
    ("misspelt_capability", "capabilities() names unknown 'fork-processes'"),
    ("capture_not_a_snapshot", "capture() returned dict, not thaw_format.Snapshot"),
    ("declared_logprobs_missing", "declares 'logprobs', so Generation.logprobs must hold one float per token"),
])
def test_a_broken_contract_rule_is_named_in_every_check(run_worker, spec, rule):
    results = run_worker(f"broken_drivers:{spec}")
    assert set(statuses(results)) == set(CHECKS) and set(statuses(results).values()) == {"failed"}
    assert all(rule in r["detail"] for r in results.values()), results["toy", "kv_identical"]["detail"]


def test_streaming_is_checked_on_a_real_engine(run_worker):
    results = run_worker("broken_drivers:silent_progress", "llama")
    got = statuses(results)
    assert got["streaming"] == "failed" and got["continuation_greedy"] == got["continuation_seeded"] == "passed"
    assert "progress() has reported [] finished of ['greedy', 'seeded']" in results["llama", "streaming"]["detail"]


@pytest.mark.parametrize("spec, rule", [
    ("abort_leaves_running", "again after its finished Progress (an aborted request must be gone)"),
    ("abort_returns_nothing", "abort() returned NoneType, not a bool: True if the request was in flight"),
])
def test_a_wrong_abort_fails_the_streaming_check_by_name(run_worker, spec, rule):
    results = run_worker(f"broken_drivers:{spec}")
    got = statuses(results)
    assert got["streaming"] == "failed" and got["continuation_greedy"] == got["mid_stream_resume"] == "passed"
    assert rule in results["toy", "streaming"]["detail"], results["toy", "streaming"]["detail"]


def test_unsupported_features_are_never_passed(run_worker):
    results = run_worker("broken_drivers:no_kv_readback")
    got = statuses(results)
    for check in ("kv_identical", "logprobs_identical", "fork_n", "streaming", "mid_stream_resume",
                  "mid_stream_resume_seeded"):
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
