"""A request that has produced k of m tokens is snapshotted, restored in a new process, and finishes with
exactly the tokens of the uninterrupted run, greedy and seeded."""

import dataclasses

from conftest import ENGINE_KWARGS, run_helper, trunk_tokens

import thaw_format


def test_mid_stream_requests_resume_exactly_in_a_new_process(engine, vllm, tmp_path):
    import thaw_vllm
    from vllm.inputs import TokensPrompt

    requests = {
        "greedy": (trunk_tokens(70, seed=20), vllm.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)),
        "seeded": (trunk_tokens(45, seed=21), vllm.SamplingParams(max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)),
    }
    core = engine.llm_engine
    for request_id, (prompt, params) in requests.items():
        core.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
    produced = {}
    while min((len(v) for v in produced.values()), default=0) < 5:
        for out in core.step():
            produced[out.request_id] = list(out.outputs[0].token_ids)
    snapshot = thaw_vllm.capture(engine, include_weights=False)
    final = {}
    while core.has_unfinished_requests():  # the uninterrupted run goes on in the parent
        for out in core.step():
            if out.finished:
                final[out.request_id] = list(out.outputs[0].token_ids)

    by_id = {r.id: r for r in snapshot.scheduler.requests}
    assert set(by_id) == set(requests)
    for request_id, request in by_id.items():
        k = len(request.output_token_ids)
        assert 5 <= k < 24 and request.status == "running"
        assert request.output_token_ids == final[request_id][:k]
        assert request.num_computed_tokens == len(request.prompt_token_ids) + k - 1
        assert sum(len(snapshot.prefix.tokens[p]) for p in request.pages) == request.num_computed_tokens
    assert by_id["seeded"].rng_state is not None and by_id["greedy"].rng_state is None

    path, no_rng = tmp_path / "midstream.thaw", tmp_path / "no-rng.thaw"
    thaw_format.save(snapshot, path)
    control = [dataclasses.replace(r, rng_state=None) for r in snapshot.scheduler.requests]
    thaw_format.save(dataclasses.replace(snapshot, scheduler=thaw_format.SchedulerState(control)), no_rng)
    resumed, without_rng = run_helper("restore_helper.py", {
        "model": engine.thaw_model, "dtype": snapshot.model.dtype, "engine_kwargs": ENGINE_KWARGS,
        "steps": [{"snapshot": str(path), "resume": True}, {"snapshot": str(no_rng), "resume": True}],
        "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},  # in-process here; test_restore covers multiprocessing mode
    })
    # control: a fresh generator seeded again does not continue the original stream
    assert without_rng["seeded"]["token_ids"] != final["seeded"]
    assert without_rng["greedy"]["token_ids"] == final["greedy"]
    for request_id, request in by_id.items():
        assert resumed[request_id]["token_ids"] == final[request_id], request_id
        # vLLM's own count: full pages from the rebuilt prefix table + the tail page from thaw's connector
        assert resumed[request_id]["num_cached_tokens"] == request.num_computed_tokens
