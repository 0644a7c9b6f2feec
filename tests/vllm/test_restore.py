"""Capture and restore on a real vLLM engine: bytes, cached-token counts, new processes, refusals."""

import dataclasses

import pytest
import torch
from conftest import ENGINE_KWARGS, generate, make_engine, run_helper, trunk_tokens

import thaw_format
from thaw_format.torch import from_torch, to_torch


def kv_bytes(snapshot):
    return [(bytes(layer.tensors["k"].data), bytes(layer.tensors["v"].data)) for layer in snapshot.kv.layers]


def test_restore_writes_the_captured_bytes_into_a_used_engine(engine, greedy, tmp_path):
    import thaw_vllm

    trunk = trunk_tokens(100, seed=1)
    generate(engine, trunk, greedy)
    before = thaw_vllm.capture(engine, include_weights=False, chains=[trunk])
    assert before.prefix.num_pages == 3 and all(len(t) == 32 for t in before.prefix.tokens)
    assert before.prefix.chain_tokens(2) == trunk[:96]
    thaw_format.save(before, tmp_path / "before.thaw")  # an id, the lineage parent of the captures after it

    generate(engine, trunk_tokens(200, seed=2), greedy)  # the engine moves on: other blocks, other KV
    thaw_vllm.restore(engine, before)
    after = thaw_vllm.capture(engine, include_weights=False)
    assert after.lineage.parent == before.id is not None
    assert after.prefix.tokens == before.prefix.tokens and after.prefix.parents == before.prefix.parents
    assert kv_bytes(after) == kv_bytes(before)  # the stale pages of the second prompt were cleared
    assert after.prefix.hash.hashes == before.prefix.hash.hashes

    tokens, cached = generate(engine, trunk, greedy)
    assert cached == 96


def page_bytes(snapshot, page: int) -> list[bytes]:
    """Page `page`'s K and V bytes in every layer (pages are the tensors' leading dimension)."""
    out = []
    for layer in snapshot.kv.layers:
        for tensor in (layer.tensors["k"], layer.tensors["v"]):
            data = bytes(tensor.data)
            size = len(data) // tensor.shape[0]
            out.append(data[page * size : (page + 1) * size])
    return out


def test_a_chain_capture_looks_its_blocks_up_without_walking_the_prefix_table(engine, greedy, monkeypatch):
    """A capture of named chains finds their blocks one lookup each (core_ops._capture): the walk over every
    cached block, whose cost grows with the table and not the capture, runs for a capture of everything, or as
    blocks are recorded once the ledger of evicted blocks passes twice the pool (then it is pruned to the cached
    blocks)."""
    import thaw_vllm
    from thaw_vllm import _internals

    core = engine.llm_engine.engine_core.engine_core
    connector, pool = core.scheduler.get_kv_connector(), _internals.num_blocks(_internals.kv_cache_manager(core))
    trunk = trunk_tokens(100, seed=3)
    generate(engine, trunk, greedy)
    generate(engine, trunk_tokens(70, seed=4), greedy)  # another chain in the table
    everything = thaw_vllm.capture(engine, include_weights=False)  # the walk: the ledger holds cached blocks only
    walks = []
    walk = _internals.cached_blocks
    monkeypatch.setattr(_internals, "cached_blocks", lambda kcm: walks.append(kcm) or walk(kcm))

    chain = thaw_vllm.capture(engine, include_weights=False, chains=[trunk])
    assert walks == [] and chain.prefix.chain_tokens(2) == trunk[:96] and chain.prefix.num_pages == 3
    trunk_hashes = chain.prefix.hash.hashes
    for page, block_hash in enumerate(trunk_hashes):  # the lookup finds the blocks the walk finds
        same = everything.prefix.hash.hashes.index(block_hash)
        assert page_bytes(chain, page) == page_bytes(everything, same)
        assert chain.prefix.tokens[page] == everything.prefix.tokens[same]

    # a ledger entry under another chain's tokens (a hash collision) ends the chain there
    last = bytes.fromhex(trunk_hashes[2])
    entry = connector.ledger[last]
    connector.ledger[last] = (entry[0], tuple(reversed(entry[1])))
    assert thaw_vllm.capture(engine, include_weights=False, chains=[trunk]).prefix.hash.hashes == trunk_hashes[:2]
    connector.ledger[last] = entry

    assert engine.reset_prefix_cache()  # every block evicted; the ledger still names them
    assert thaw_vllm.capture(engine, include_weights=False, chains=[trunk]).prefix.num_pages == 0
    assert walks == [] and {bytes.fromhex(h) for h in trunk_hashes} <= connector.ledger.keys()
    generate(engine, trunk, greedy)
    cached_again = thaw_vllm.capture(engine, include_weights=False, chains=[trunk])
    assert walks == [] and cached_again.prefix.hash.hashes == trunk_hashes and kv_bytes(cached_again) == kv_bytes(chain)

    # blocks never cached (made-up hashes): the ledger passes twice the pool as they are recorded, and prunes itself
    made_up = [i.to_bytes(32, "big") for i in range(2 * pool)]
    connector.learn(made_up, [5] * (len(made_up) * connector.block_size), len(made_up))
    assert len(walks) == 1 and {bytes.fromhex(h) for h in trunk_hashes} <= connector.ledger.keys()
    assert len(connector.ledger) <= 2 * pool
    again = thaw_vllm.capture(engine, include_weights=False, chains=[trunk])
    assert len(walks) == 1 and kv_bytes(again) == kv_bytes(chain) and again.prefix.hash.hashes == trunk_hashes
    thaw_vllm.capture(engine, include_weights=False)
    assert len(walks) == 2 and connector.ledger.keys() == {bytes.fromhex(h) for h in trunk_hashes}


def test_an_engine_that_never_captures_keeps_its_ledger_within_twice_the_pool(engine, greedy, monkeypatch):
    """The ledger (token ids by block hash) used to grow by every block the engine ever computed until a capture
    pruned it: an engine serving for hours, never captured, kept them all. It prunes itself as blocks are recorded
    once it passes twice the pool, walking the prefix-cache table once per at least a pool's worth of new blocks,
    and keeps every cached block: a capture afterwards finds the last prompts' pages as they were left, and the
    trunk's bytes as before, with a prefix-cache hit on restore."""
    import thaw_vllm
    from thaw_vllm import _internals
    from vllm.inputs import TokensPrompt

    core = engine.llm_engine.engine_core.engine_core
    connector, kcm = core.scheduler.get_kv_connector(), _internals.kv_cache_manager(core)
    pool, bs = _internals.num_blocks(kcm), connector.block_size
    trunk = trunk_tokens(100, seed=11)
    generate(engine, trunk, greedy)
    before = thaw_vllm.capture(engine, include_weights=False, chains=[trunk])
    sizes, walks = [], []
    learn, walk = connector.learn, _internals.cached_blocks
    monkeypatch.setattr(connector, "learn", lambda *args: (learn(*args), sizes.append(len(connector.ledger))))
    monkeypatch.setattr(_internals, "cached_blocks", lambda kcm: walks.append(kcm) or walk(kcm))
    prompt_blocks = 32  # distinct prompts of 32 full blocks each, 8 at a time, until 3 pools' worth are computed
    for batch in range(-(-3 * pool // (8 * prompt_blocks))):
        prompts = [trunk_tokens(prompt_blocks * bs, seed=1000 + 8 * batch + i) for i in range(8)]
        engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy, use_tqdm=False)
    new_blocks = 8 * prompt_blocks * (batch + 1)
    assert len(sizes) >= new_blocks // prompt_blocks and max(sizes) <= 2 * pool, (max(sizes), pool)
    assert 1 <= len(walks) <= new_blocks // pool + 1, (len(walks), new_blocks, pool)
    monkeypatch.undo()

    assert {h for h, g, _ in _internals.cached_blocks(kcm) if g == 0} <= connector.ledger.keys()
    last = thaw_vllm.capture(engine, include_weights=False, chains=[prompts[-1]])  # not generated again
    assert last.prefix.num_pages == prompt_blocks and last.prefix.chain_tokens(prompt_blocks - 1) == prompts[-1]

    generate(engine, trunk, greedy)  # the trunk again (its blocks may have been evicted meanwhile)
    after = thaw_vllm.capture(engine, include_weights=False, chains=[trunk])
    assert after.prefix.hash.hashes == before.prefix.hash.hashes and kv_bytes(after) == kv_bytes(before)
    generate(engine, trunk_tokens(200, seed=12), greedy)
    thaw_vllm.restore(engine, after)
    assert generate(engine, trunk, greedy)[1] == 96


def test_weights_in_a_snapshot_are_the_checkpoint_bytes(engine):
    import thaw_vllm
    from safetensors.torch import load_file

    snapshot = thaw_vllm.capture(engine, include_weights=True)
    checkpoint = load_file(str(engine.thaw_model + "/model.safetensors"))
    assert set(snapshot.weights.tensors) == set(checkpoint)
    for name, tensor in checkpoint.items():
        assert bytes(snapshot.weights.tensors[name].data) == tensor.view(torch.uint8).numpy().tobytes(), name
    # the engine's identity is the checkpoint's (spec 5.1), the one every engine computes from the files
    assert snapshot.model.weights_digest == thaw_format.weights_digest(snapshot.weights.tensors)
    assert snapshot.model.weights_digest == thaw_format.checkpoint_weights_digest(engine.thaw_model)
    assert thaw_vllm.describe(engine)["model"]["weights_digest"] == snapshot.model.weights_digest


def corrupted(snapshot):
    """The same prefix tree and hashes, with random KV bytes of the same dtype."""
    gen = torch.Generator().manual_seed(0)
    layers = []
    for layer in snapshot.kv.layers:
        noisy = {}
        for role, t in layer.tensors.items():
            ref = to_torch(t)
            noisy[role] = from_torch(torch.randn(ref.shape, generator=gen).to(ref.dtype) * 3)
        layers.append(dataclasses.replace(layer, tensors=noisy))
    return dataclasses.replace(snapshot, kv=dataclasses.replace(snapshot.kv, layers=layers), weights=None)


def test_new_process_restore_hits_the_cache_and_continues_identically(engine, greedy, tmp_path):
    """Weights (load_format="thaw") and KV both come from the snapshot file in a fresh process; the
    control restores random KV under the same hashes and must change the output."""
    import thaw_vllm

    trunk = trunk_tokens(150, seed=3)
    suffixes = [trunk_tokens(7, seed=10 + i) for i in range(2)]
    generate(engine, trunk, greedy)
    snapshot = thaw_vllm.capture(engine, include_weights=True, chains=[trunk])
    expected = [generate(engine, trunk + s, greedy)[0] for s in suffixes]
    path, bad = tmp_path / "trunk.thaw", tmp_path / "corrupt.thaw"
    thaw_format.save(snapshot, path)
    thaw_format.save(corrupted(snapshot), bad)
    params = {"max_tokens": greedy.max_tokens, "temperature": 0.0, "ignore_eos": True}
    prompts = [trunk + s for s in suffixes]
    result = run_helper("restore_helper.py", {
        "model": engine.thaw_model, "dtype": snapshot.model.dtype, "engine_kwargs": ENGINE_KWARGS,
        "weights_from": str(path), "recapture": str(tmp_path / "again.thaw"),
        "steps": [{"snapshot": str(path), "prompts": prompts[:1], "params": params},
                  {"snapshot": str(bad), "prompts": prompts[:1], "params": params},
                  {"snapshot": str(path), "prompts": prompts, "params": params}],
    })
    cached_tokens = 4 * 32  # the trunk's full pages
    good, control, again = result
    assert good[0] == {"token_ids": expected[0], "num_cached_tokens": cached_tokens}
    assert control[0]["num_cached_tokens"] == cached_tokens and control[0]["token_ids"] != expected[0]
    assert [o["token_ids"] for o in again] == expected
    assert again[0]["num_cached_tokens"] == cached_tokens  # the first prompt; the second also hits its sibling's pages

    recaptured = thaw_format.load(tmp_path / "again.thaw")  # KV and weights as the new process holds them
    assert recaptured.model.weights_digest == snapshot.model.weights_digest  # load_format="thaw" keeps the identity
    assert recaptured.engine.native_kv_layout == snapshot.engine.native_kv_layout
    pages = {tuple(t): i for i, t in enumerate(recaptured.prefix.tokens)}
    for i, tokens in enumerate(snapshot.prefix.tokens):
        j = pages[tuple(tokens)]
        for old, new in zip(snapshot.kv.layers, recaptured.kv.layers):
            for role in ("k", "v"):
                before, after = to_torch(old.tensors[role])[i], to_torch(new.tensors[role])[j]
                assert before.view(torch.uint8).equal(after.view(torch.uint8))


@pytest.fixture(scope="module")
def other_engines(vllm, zoo):
    return {"model": make_engine(zoo, "qwen3", "float32"), "dtype": make_engine(zoo, "llama", "bfloat16")}


@pytest.mark.parametrize("other", ["model", "dtype", "block_size", "weights", "request"])
def test_mismatched_snapshot_is_refused_and_the_engine_still_serves(vllm, zoo, other_engines, greedy, other):
    import thaw_vllm

    target = make_engine(zoo, "llama", "float32")
    trunk = trunk_tokens(70, seed=4)
    reference = generate(target, trunk, greedy)[0]
    own = thaw_vllm.capture(target, include_weights=False)
    if other == "block_size":
        snapshot = dataclasses.replace(own, kv=dataclasses.replace(own.kv, page_size=64))
        field = "kv.page_size"
    elif other == "weights":  # same config, other weights (as a differently seeded checkpoint would have)
        snapshot = dataclasses.replace(own, model=dataclasses.replace(own.model, weights_digest="sha256:" + "0" * 64))
        field = "model.weights_digest"
    elif other == "request":  # a resumed request whose pages do not hold its computed tokens
        bad = thaw_format.Request(id="r", status="running", prompt_token_ids=trunk, output_token_ids=[5],
                                  num_computed_tokens=70, pages=[0])
        snapshot = dataclasses.replace(own, scheduler=thaw_format.SchedulerState([bad]))
        field = "request 'r'"
    else:
        source = other_engines[other]
        generate(source, trunk, greedy)
        snapshot = thaw_vllm.capture(source, include_weights=False)
        field = "model.architecture" if other == "model" else "model.dtype"
    with pytest.raises(thaw_format.IncompatibleSnapshotError, match=field):
        thaw_vllm.restore(target, snapshot)
    assert generate(target, trunk, greedy)[0] == reference
