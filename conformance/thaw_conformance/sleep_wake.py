"""The sleep/wake check, written once for the conformance suite (runner: the parent sleeps, a later process
wakes) and for the tests (tests/sleep_checks.py).

Greedy requests sharing a trunk run alone first (what each must give), then together: submitted, stepped a few
tokens, and the engine is put to sleep in a file, which closes it. A new engine woken from the file takes new
requests beside them (their ids must not be restored ones': a fresh engine's id counter starts again), then
finishes all: the resumed ones with exactly the token ids they got alone, the engine's own cached-token count
showing that they read the restored pages, and the new ones with the tokens they get alone. The trunk is two
full pages of the engine's and a partial one, or 70 tokens where longer (trunk_for), so that the count shows it
at any page size.
"""

from __future__ import annotations

import random

from thaw_format.sdk import greedy, sleep

from .results import CheckFailed

PARAMS = greedy(12)
STEPS = 4  # tokens each request has made when the engine sleeps (fewer on an engine whose first step prefills)


def tokens(n: int, seed: int) -> list[int]:
    """Deterministic ids in [3, 250): every zoo model's vocabulary holds them, and the template's (256)."""
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


def trunk_for(page_size: int) -> list[int]:
    """Two full pages of `page_size` tokens and a partial one, or 70 tokens where that is longer (two pages of 32
    and a partial one: an engine of small pages restores many): an engine's cached-token count for a prompt
    extending it shows whether restored pages were read, whatever the engine's page size."""
    return tokens(max(70, 2 * page_size + max(1, page_size // 5)), seed=1)  # the same ids, only more of them


def in_flight_on(trunk_ids: list[int]) -> list[list[int]]:
    """The requests in flight when the engine sleeps: the trunk and a tail of its own each."""
    return [trunk_ids + tokens(3, seed=2), trunk_ids + tokens(5, seed=3)]


def new_prompt_on(trunk_ids: list[int]) -> list[int]:
    """What a woken engine takes beside the resumed requests."""
    return trunk_ids + tokens(4, seed=4)


TRUNK = trunk_for(32)  # for the tests, on engines of pages of 32 tokens or fewer
PROMPTS = in_flight_on(TRUNK)
NEW_PROMPT = new_prompt_on(TRUNK)
NEW_REQUESTS = 4  # submitted to a woken engine: as many ids as the sleeper's generate and submit calls used


def run_midway(engine, prompts=PROMPTS) -> tuple[list[str], list[list[int]]]:
    """Each prompt alone (the reference), then all submitted and stepped STEPS times: (their ids, references)."""
    want = [engine.generate(prompt, PARAMS).token_ids for prompt in prompts]
    ids = [engine.submit(prompt, PARAMS) for prompt in prompts]
    for _ in range(STEPS):
        engine.step()
    return ids, want


def sleep_midway(engine, path, prompts=PROMPTS, at_sleep=None) -> list[list[int]]:
    """run_midway, then sleep the engine to `path` (closing it all the same if that fails); the references, in
    the prompts' order. `at_sleep(engine)` checks the engine just before it sleeps."""
    try:
        _, want = run_midway(engine, prompts)
        if at_sleep is not None:
            at_sleep(engine)
        sleep(engine, path)
    except BaseException:
        engine.close()
        raise
    return want


def full_pages(engine, prompt: list[int]) -> int:
    return len(prompt) // engine.page_size() * engine.page_size()


def _must(ok: bool, why: str) -> None:
    if not ok:
        raise CheckFailed(why)


def check_woken(awake, want: list[list[int]], prompts=PROMPTS, trunk_ids=TRUNK) -> str:
    """The woken engine takes new requests beside the resumed ones, with ids of their own, then finishes them all
    exactly, the resumed ones reading the restored trunk (`trunk_ids`, which the prompts extend: CheckFailed
    otherwise); what was seen, in words."""
    engine = awake.engine
    _must(sorted(r.prompt_token_ids for r in awake.resumed) == sorted(prompts),
          f"resumed {len(awake.resumed)} requests, not the {len(prompts)} in flight at sleep")
    _must(any(r.previous_output_token_ids for r in awake.resumed), "no resumed request had output: slept mid-way?")
    new = [engine.submit(new_prompt_on(trunk_ids), PARAMS) for _ in range(NEW_REQUESTS)]
    resumed = {r.request_id for r in awake.resumed}
    _must(len(set(new)) == NEW_REQUESTS and not resumed & set(new), f"ids {new} clash with restored {resumed}")
    done = engine.finish()  # every request in flight
    _must(done.keys() == resumed | set(new), f"finish() gave {sorted(done)}, not {sorted(resumed | set(new))}")
    held = full_pages(engine, trunk_ids)
    _must(held > 0, f"the engine's page ({engine.page_size()} tokens) is longer than the {len(trunk_ids)}-token "
          "trunk: its cached-token count cannot show that the restored pages were read (trunk_for(page_size) fits)")
    cached = []
    for request in awake.resumed:
        finished = done[request.request_id]
        expected = want[prompts.index(request.prompt_token_ids)]
        _must(finished.output_token_ids == expected,
              f"{request.request_id} finished with {finished.output_token_ids}, alone it gave {expected}")
        _must(finished.cached_tokens >= held,
              f"{request.request_id}: {finished.cached_tokens} cached tokens, the restored trunk has {held}")
        cached.append(finished.cached_tokens)
    alone = engine.generate(new_prompt_on(trunk_ids), PARAMS).token_ids
    _must(all(done[rid].output_token_ids == alone for rid in new), "a new request beside them gave other tokens")
    return (f"{len(resumed)} requests slept mid-stream finished as alone ({cached} cached tokens), "
            f"{NEW_REQUESTS} new ones beside them too")
