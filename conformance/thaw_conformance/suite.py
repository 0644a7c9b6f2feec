"""The conformance checks as a pytest test module; see thaw_conformance.pytest_plugin for how to run it."""

import pytest


def test_conformance(thaw_case, thaw_results):
    spec, arch, check = thaw_case
    result = thaw_results(spec, arch)[check]
    if result["status"] in ("unsupported", "skipped"):
        pytest.skip(result["detail"])
    if result["status"] != "passed":
        pytest.fail(f"{check} {result['status']}: {result['detail']}", pytrace=False)
