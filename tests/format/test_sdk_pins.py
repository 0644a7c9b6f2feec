"""The version pin every adapter checks at import (thaw_format.sdk.pins)."""

import pytest

from thaw_format.sdk.pins import require_tested


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu"])
def test_an_exact_pin_accepts_that_release(version):
    require_tested("thaw_x", "engine", version, ["0.32.0"])


def test_a_prefix_pin_accepts_its_patch_releases():
    require_tested("thaw_x", "engine", "5.24.7", ["5.24."])


@pytest.mark.parametrize("version", ["0.32.1", "0.3", "5.240.0"])
def test_another_release_is_refused_naming_both_and_where_to_add_it(version):
    with pytest.raises(ImportError) as refused:
        require_tested("thaw_x", "engine", version, ["0.32.0", "5.24."])
    message = str(refused.value)
    assert version in message and "0.32.0 or 5.24.x" in message and "thaw_x/_internals.py" in message
