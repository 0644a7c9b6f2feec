"""The sleep/wake check's trunk is two full pages of the engine's and a partial one, or 70 tokens where that is
longer (small pages restore many): a driver of 128-token pages (the template engine, large_pages_driver)
is tested, its restored trunk seen in its cached-token count, where a fixed 70-token trunk failed the check for
want of a full page."""

import pytest

from thaw_conformance.sleep_wake import PROMPTS, TRUNK, in_flight_on, trunk_for


@pytest.mark.parametrize("page_size", [1, 4, 16, 32, 35, 128, 1024])
def test_the_trunk_is_two_full_pages_and_a_partial_one_or_70_tokens(page_size):
    trunk = trunk_for(page_size)
    full, partial = divmod(len(trunk), page_size)
    assert len(trunk) >= 70 and (len(trunk) == 70 or (full, partial > 0) == (2, True))  # longer for long pages
    assert trunk[: len(TRUNK)] == TRUNK  # the same ids, only more of them


def test_the_tests_trunk_is_the_one_at_32_tokens_a_page():
    assert len(TRUNK) == 70 and TRUNK == trunk_for(32) and PROMPTS == in_flight_on(TRUNK)


def test_a_driver_of_large_pages_is_tested_on_a_trunk_that_grows(run_worker):
    results = run_worker("large_pages_driver:driver")
    sleep_wake = results["toy", "sleep_wake"]
    assert sleep_wake["status"] == "passed", sleep_wake["detail"]
    cached = [int(n) for n in sleep_wake["detail"].split("[")[1].split("]")[0].split(",")]
    assert len(cached) == 2 and min(cached) >= 2 * 128  # the two full pages of the restored trunk
