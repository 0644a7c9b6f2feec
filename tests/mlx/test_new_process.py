"""Resume in a NEW process, from the snapshot file alone (model rebuilt from its config and weights, torch
blocked): every case continues exactly as the parent does and ends with byte-identical KV."""

import pytest

import thaw_format
import thaw_mlx
from resume_worker import run_in_new_process
from sessions import CASES, kv_digest, start

MORE_TOKENS = 12


@pytest.fixture(scope="module")
def resumed(model_of, tmp_path_factory):
    """case name -> (parent's continuation, child's continuation); all children run in one worker process."""
    jobs, expected = [], {}
    for name, case in CASES.items():
        model, cache, tokens = start(case, model_of(name))
        path = tmp_path_factory.mktemp(name) / "session.thaw"
        thaw_format.save(thaw_mlx.capture(model, cache, tokens), path)
        out = list(thaw_mlx.generate(model, cache, tokens, MORE_TOKENS))
        expected[name] = {"tokens": out, "kv_digest": kv_digest(model, cache, tokens + out)}
        jobs.append({"snapshot": str(path), "suffix": [], "max_tokens": MORE_TOKENS})
    return {name: (expected[name], child) for name, child in zip(CASES, run_in_new_process(jobs))}


@pytest.mark.parametrize("name", list(CASES))
def test_new_process_continues_exactly(name, resumed):
    parent, child = resumed[name]
    assert child["tokens"] == parent["tokens"]
    assert child["kv_digest"] == parent["kv_digest"]
    assert len(set(parent["tokens"])) > 3  # the model is not stuck on one token, so a wrong cache would show
