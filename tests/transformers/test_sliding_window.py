"""A model with sliding-window layers (gemma2, window 8) on prompts far past its window: the engine's KV keeps
every token (so every page is whole), it computes what transformers' own generate computes, and a restore
continues exactly from pages whose tokens left the window long ago."""

import torch

import thaw_format
from thaw_format.sdk import greedy, seeded
from conftest import PROMPT, page_bytes


def test_layers_slide(engine):
    layouts = engine("gemma2", small_window=True).layouts
    assert [layout.window for layout in layouts] == [8, None]  # gemma2 alternates sliding and full layers


def test_same_tokens_and_logits_as_transformers_generate(engine):
    e = engine("gemma2", small_window=True)
    ours = e.generate(PROMPT, greedy(10))
    model = e.model
    with torch.inference_mode():
        theirs = model.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, eos_token_id=None)
    assert theirs.sequences[0, len(PROMPT):].tolist() == ours.token_ids
    logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(theirs.scores, ours.token_ids)]
    assert logprobs == ours.logprobs


def test_restore_past_the_window(engine, saved):
    parent = engine("gemma2", small_window=True)
    first = parent.generate(PROMPT, seeded(3, 6))
    snap = parent.capture()
    assert [len(t) for t in snap.prefix.tokens] == [32, 32, 11]  # every token's KV, not only the window's
    path = saved(snap)
    prompt = PROMPT + first.token_ids
    want = parent.generate(prompt, seeded(5, 8))
    child = engine("gemma2", small_window=True)
    child.restore(thaw_format.load(path))
    assert page_bytes(child.capture(include_weights=False)) == page_bytes(thaw_format.load(path))
    got = child.generate(prompt, seeded(5, 8))
    assert (got.token_ids, got.logprobs, got.cached_tokens) == (want.token_ids, want.logprobs, len(prompt) - 1)
    assert len(set(got.token_ids)) > 3
