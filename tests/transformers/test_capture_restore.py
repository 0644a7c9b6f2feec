"""Capture, then restore into a fresh engine: KV and weights land byte for byte, the prefix cache is hit by the
engine's own count, and the continuation is token- and logprob-identical."""

import pytest

import thaw_format
from thaw_format.sdk import greedy, seeded
from conftest import PROMPT, page_bytes

ARCHS = ["llama", "qwen3", "gemma2", "phi3", "qwen3_moe", "deepseek_v2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_restore_lands_bytes_hits_and_continues(arch, engine, saved):
    parent = engine(arch)
    first = parent.generate(PROMPT, greedy(6))
    path = saved(parent.capture())
    prompt = PROMPT + first.token_ids
    want = {"greedy": parent.generate(prompt, greedy(8)), "seeded": parent.generate(prompt, seeded(1234, 8))}

    child = engine(arch)
    assert child.restore(thaw_format.load(path)) == []
    stored = thaw_format.load(path)
    assert page_bytes(child.capture(include_weights=False)) == page_bytes(stored)
    got = {"greedy": child.generate(prompt, greedy(8)), "seeded": child.generate(prompt, seeded(1234, 8))}
    for kind in want:
        assert got[kind].token_ids == want[kind].token_ids
        assert got[kind].logprobs == want[kind].logprobs  # floats compared exactly
    assert got["greedy"].cached_tokens == want["greedy"].cached_tokens == len(prompt) - 1
    assert len(set(want["seeded"].token_ids)) > 3  # outputs vary, so a wrong cache would show


def test_kv_layout_matches_the_format(engine):
    parent = engine("llama")
    parent.generate(PROMPT, greedy(6))
    snap = parent.capture()
    assert snap.kv.page_size == 32 and snap.prefix.num_pages == 3  # 75 computed tokens: 32 + 32 + 11
    assert [len(t) for t in snap.prefix.tokens] == [32, 32, 11] and snap.prefix.parents == [-1, 0, 1]
    for layer in snap.kv.layers:
        assert (layer.kind, layer.num_kv_heads, layer.head_dim) == ("attention", 2, 32)
        assert layer.tensors["k"].shape == (3, 32, 2, 32)
    assert snap.model == parent.model_info()


def test_identity_is_the_checkpoints(engine):
    """The same ModelInfo every engine writes for the checkpoint (spec 5.1), so snapshots cross engines."""
    import json
    from conftest import model_dir
    info = engine("llama").model_info()
    config = json.loads((model_dir("llama") / "config.json").read_text())
    assert info == thaw_format.checkpoint_model_info(config, "float32",
                                                     thaw_format.checkpoint_weights_digest(model_dir("llama")))


def test_noise_kv_is_read(engine, saved):
    """Control: other bytes under the same token ids are hit, and change what the engine computes."""
    import numpy as np
    parent = engine("llama")
    first = parent.generate(PROMPT, greedy(6))
    snap = parent.capture(include_weights=False)
    prompt = PROMPT + first.token_ids
    want = parent.generate(prompt, greedy(8))
    rng = np.random.default_rng(0)
    for layer in snap.kv.layers:
        for role, t in layer.tensors.items():
            layer.tensors[role] = thaw_format.as_tensor(rng.standard_normal(t.shape).astype(np.float32) * 3)
    child = engine("llama")
    child.restore(thaw_format.load(saved(snap)))
    got = child.generate(prompt, greedy(8))
    assert got.cached_tokens == want.cached_tokens
    assert got.logprobs != want.logprobs


def test_weights_are_loaded(fresh_engine, saved):
    """A snapshot's weights replace the engine's own, byte for byte."""
    import torch
    parent = fresh_engine("llama")
    parent.generate(PROMPT, greedy(2))
    path = saved(parent.capture())
    child = fresh_engine("llama")
    with torch.no_grad():
        next(child.model.parameters()).zero_()  # drifted weights, which the restore must overwrite
    child.restore(thaw_format.load(path))
    stored = thaw_format.load(path).weights.tensors
    live = child.capture().weights.tensors
    assert stored.keys() == live.keys()
    assert all(bytes(stored[n].data) == bytes(live[n].data) for n in stored)


def test_capture_without_weights_names_them(engine):
    parent = engine("llama")
    parent.generate(PROMPT, greedy(2))
    snap = parent.capture(include_weights=False)
    assert not snap.weights.tensors and snap.weights.ref.weights_digest == parent.model_info().weights_digest


def test_chains_limit_the_pages(engine):
    parent = engine("llama")
    parent.generate(PROMPT, greedy(2))
    other = [900 + i for i in range(40)]
    computed = other + parent.generate(other, greedy(2)).token_ids[:1]  # the last token's KV is never computed
    snap = parent.capture(include_weights=False, chains=[computed + [5, 6]])
    assert [t for page in snap.prefix.tokens for t in page] == computed  # the second prompt's 32 + 9 tokens only
    # a page holding a chain's first tokens is kept whole (a prompt's partial hit), one holding none of them is not
    assert parent.capture(include_weights=False, chains=[other[:33]]).prefix.tokens == [other[:32], computed[32:]]
    assert parent.capture(include_weights=False, chains=[other[:32] + [5]]).prefix.tokens == [other[:32]]


def test_capture_changes_nothing(engine):
    e = engine("llama")
    first = e.generate(PROMPT, greedy(6))
    before = page_bytes(e.capture())
    rid = e.submit(PROMPT[::-1][:40], greedy(10))
    e.step()
    e.capture()
    assert set(page_bytes(e.capture())) > set(before)  # the in-flight request's pages are in the snapshot
    e.finish()
    assert e.generate(PROMPT + first.token_ids, greedy(4)).cached_tokens == 75
    assert rid not in e.requests


@pytest.mark.parametrize("arch", ["llama", "deepseek_v2"])
def test_hundreds_of_pages_in_blocks(arch, engine, saved):
    """Pages of 4 tokens, so hundreds of them, added in blocks: a trunk, a longer prompt that extends its partial
    leaf, branches off it, a request in flight. The snapshot restores and captures again byte for byte, in the
    parent's page order; the restored engine hits what the parent hits and continues with its tokens; and noise a
    snapshot holds past a partial page's tokens (unspecified, spec 5.3) is captured again as zeros."""
    import numpy as np
    from conftest import model_dir
    from thaw_transformers import TransformersEngine

    base = engine(arch)
    small_pages = lambda: TransformersEngine(base.model, checkpoint=model_dir(arch), info=base.info, page_size=4)
    parent = small_pages()
    trunk = [(5 * i + 1) % 1000 + 3 for i in range(601)]
    trunk += parent.generate(trunk, greedy(2)).token_ids  # 602 computed tokens: 150 pages and a partial one
    branches = [trunk[: 200 + 37 * i] + [7 + i] * 9 for i in range(3)]
    for prompt in [trunk + [11, 12, 13]] + branches:
        parent.generate(prompt, greedy(2))
    rid = parent.submit(trunk[:301] + [9, 9, 9], seeded(5, 6))
    for _ in range(2):
        parent.step()
    snap = parent.capture(include_weights=False)
    assert snap.prefix.num_pages > 160 and len({id(page.block) for page in parent.cache.pages}) >= 5
    path = saved(snap)
    prompts = [trunk + [11, 12, 13, 14], trunk[:450] + [1], *(b + [2] for b in branches)]
    want = [parent.generate(p, greedy(3)) for p in prompts]
    want_in_flight = parent.finish()[rid]

    child = small_pages()
    resumed = child.restore(thaw_format.load(path))
    assert len({id(page.block) for page in child.cache.pages}) == 1
    stored = thaw_format.load(path)
    again = child.capture(include_weights=False)
    assert again.prefix.parents == stored.prefix.parents and again.prefix.tokens == stored.prefix.tokens
    assert [bytes(t.data) for layer in again.kv.layers for t in layer.tensors.values()] == \
        [bytes(t.data) for layer in stored.kv.layers for t in layer.tensors.values()]
    got = [child.generate(p, greedy(3)) for p in prompts]
    assert [(g.token_ids, g.cached_tokens, g.logprobs) for g in got] == \
        [(w.token_ids, w.cached_tokens, w.logprobs) for w in want]
    assert [w.cached_tokens for w in want[:3]] == [len(trunk) + 3, 450, len(branches[0])]
    full = {prefix: kv for prefix, kv in page_bytes(stored).items() if len(prefix) % 4 == 0}
    assert page_bytes(child.capture(include_weights=False)).items() >= full.items()  # hits read pages, never write
    in_flight = child.finish(resumed)[rid]
    assert in_flight.output_token_ids == want_in_flight.output_token_ids
    assert in_flight.cached_tokens == 304 + 1  # its prompt and first output from the pages; the second is fed

    for layer in stored.kv.layers:  # noise past each partial page's tokens
        for t in layer.tensors.values():
            rows = np.frombuffer(t.data, np.uint8).reshape(t.shape[0], t.shape[1], -1)
            for p, tokens in enumerate(stored.prefix.tokens):
                rows[p, len(tokens):] = 0x3C
    noisy = small_pages()
    noisy.restore(thaw_format.load(saved(stored, "noisy.thaw")))
    assert page_bytes(noisy.capture(include_weights=False)) == page_bytes(snap)


def test_restore_source_from_a_file_and_from_shared_memory(engine, saved):
    """The contract's capture_shared / restore_source as methods (thaw_format.sdk.shared.SharedKV), as the
    message of a path handed to restore() advises: the child holds the parent's pages, and hits them."""
    parent = engine("llama")
    parent.generate(PROMPT, greedy(6))
    path = saved(parent.capture(include_weights=False))
    for source, chains in ((str(path), None), (parent.capture_shared(chains=[PROMPT]), [PROMPT])):
        child = engine("llama")
        child.restore_source(source)
        assert page_bytes(child.capture(include_weights=False)) == page_bytes(
            parent.capture(include_weights=False, chains=chains))
        assert child.generate(PROMPT + [5], greedy(2)).cached_tokens == len(PROMPT)
