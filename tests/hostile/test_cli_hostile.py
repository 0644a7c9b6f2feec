"""The `thaw` command on hostile files: `verify` exits 1 with the reader's message for every hostile file and 0
for the controls; `inspect` must not end in a traceback either."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile import craft
from hostile.test_properties import DELETE, DOCUMENT, DOCUMENT_PATHS, PAYLOADS, json_values, replaced
from thaw_format.cli import main

CORPUS = Path(__file__).with_name("corpus")
ENTRIES = json.loads((CORPUS / "index.json").read_text())["cases"]


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_verify_exits_with_the_readers_message(entry, capsys):
    code = main(["verify", str(CORPUS / entry["file"])])
    err = capsys.readouterr().err
    assert code == (0 if entry["error"] is None else 1)
    if entry["error"] is not None:
        assert f"thaw verify: {entry['error']}: " in err and entry["match"] in err


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_inspect_exits_without_a_traceback(entry, capsys):
    assert main(["inspect", str(CORPUS / entry["file"])]) in (0, 1)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(DOCUMENT_PATHS), new=json_values | st.just(DELETE))
def test_inspect_any_edited_document(path, new, tmp_path):
    target = tmp_path / "edited.thaw"
    target.write_bytes(craft.container(replaced(DOCUMENT, path, new), PAYLOADS, optional=1))
    assert main(["inspect", str(target)]) in (0, 1)
