"""Capture, restore into new engines, and fork: bytes identical, prefix cache hit, identical continuations."""

import dataclasses

import pytest
import torch
from conftest import SUFFIXES, generate
from thaw_format import KVCache
from thaw_format.torch import from_torch


def _as_bytes(tensor):
    return bytes(tensor.data)


def test_child_holds_the_parents_kv_tree_and_weights_byte_for_byte(family):
    parent, child = family.snapshot, family.child_snapshot
    assert child.prefix == parent.prefix
    assert parent.prefix.num_pages >= 4  # two prompts part inside a page: shared pages and one page each
    assert child.kv.page_size == parent.kv.page_size and len(child.kv.layers) == len(parent.kv.layers)
    for theirs, ours in zip(parent.kv.layers, child.kv.layers):
        assert (ours.kind, ours.num_kv_heads, ours.head_dim) == (theirs.kind, theirs.num_kv_heads, theirs.head_dim)
        for role in ("k", "v"):
            assert ours.tensors[role].shape == theirs.tensors[role].shape
            assert _as_bytes(ours.tensors[role]) == _as_bytes(theirs.tensors[role])
    assert child.weights.tensors.keys() == parent.weights.tensors.keys()
    for name, tensor in parent.weights.tensors.items():
        assert _as_bytes(child.weights.tensors[name]) == _as_bytes(tensor), name
    assert child.model == parent.model
    assert child.lineage.parent.startswith("sha256:")  # the snapshot the fork restored from


def test_snapshot_pages_hold_the_radix_paths(family):
    """Each leaf chain is one prompt and its output, less the last token (sampled, never fed back)."""
    chains = sorted(family.snapshot.prefix.chain_tokens(leaf) for leaf in family.snapshot.prefix.leaves())
    assert family.continued_prefix[: family.restored_prefix_len] in chains
    assert len(chains) == 2


@pytest.mark.parametrize("index", range(len(SUFFIXES)))
def test_each_fork_hits_the_restored_prefix_and_continues_like_the_parent(family, index):
    output, cached = generate(family.children[index], family.continued_prefix + SUFFIXES[index])
    assert cached == family.restored_prefix_len
    assert output == family.references[index]


def _scrambled(kv: KVCache, seed: int) -> KVCache:
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for layer in kv.layers:
        tensors = {}
        for role, tensor in layer.tensors.items():
            noise = torch.randn(tensor.shape, generator=generator).to(getattr(torch, tensor.dtype))
            tensors[role] = from_torch(noise)
        layers.append(dataclasses.replace(layer, tensors=tensors))
    return dataclasses.replace(kv, layers=layers)


def test_restored_bytes_are_what_the_engine_reads(thaw_sglang, family):
    """Control: the same tree over other KV bytes is still a full cache hit, but the continuation changes."""
    child, prompt = family.children[0], family.continued_prefix + SUFFIXES[0]
    scrambled = dataclasses.replace(family.snapshot, kv=_scrambled(family.snapshot.kv, seed=1))
    thaw_sglang.restore(child, scrambled)
    output, cached = generate(child, prompt)
    assert cached == family.restored_prefix_len
    assert output != family.references[0]
    thaw_sglang.restore(child, family.snapshot)
    assert thaw_sglang.capture(child, include_weights=False).lineage.parent == family.snapshot.id
    assert generate(child, prompt) == (family.references[0], family.restored_prefix_len)


def test_sglang_leak_check_stays_silent(family):
    for engine in [family.parent, *family.children]:
        assert engine.leak_warnings() == 0
