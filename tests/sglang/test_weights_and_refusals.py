"""Weights travel with a snapshot; a snapshot the engine cannot take is refused before anything changes.

The family's engines are shared by every module that uses them: a test that loads other weights or KV into one
gives it back as the fork left it (`given_back`), and the fork a test shuts down is its own, so these tests neither
depend on nor change what other files' tests find."""

import dataclasses
import os

import pytest
import torch
from conftest import SUFFIXES, generate
from thaw_format import IncompatibleSnapshotError, Tensor, checkpoint_weights_digest, weights_digest
from thaw_format.torch import from_torch, to_torch


def _state(thaw_sglang, engine):
    snapshot = thaw_sglang.capture(engine)
    return snapshot.prefix, [bytes(t.data) for layer in snapshot.kv.layers for t in layer.tensors.values()], {
        name: bytes(t.data) for name, t in snapshot.weights.tensors.items()
    }


def _other_weights(snapshot, seed):
    """The same model with other random weights: every tensor replaced, names, shapes and dtypes kept."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: from_torch(torch.randn(t.shape, generator=generator).mul(0.1).to(getattr(torch, t.dtype)))
        for name, t in snapshot.weights.tensors.items()
    }
    return dataclasses.replace(
        snapshot,
        model=dataclasses.replace(snapshot.model, weights_digest=weights_digest(tensors)),
        weights=dataclasses.replace(snapshot.weights, tensors=tensors),
    )


@pytest.fixture
def given_back(thaw_sglang, family):
    """family.children[i] for a test that changes it (weights, KV, its radix tree), each restored afterwards to
    the snapshot it was forked from, however the test ended."""
    taken = []

    def take(i: int):
        taken.append(i)
        return family.children[i]

    yield take
    for i in taken:
        thaw_sglang.restore(family.children[i], family.snapshot)


def test_weights_are_named_by_their_checkpoint(thaw_sglang, zoo, family):
    """Carried or not, the weights' identity is the checkpoint's digest, which every engine computes alike."""
    kv_only = thaw_sglang.capture(family.children[1], include_weights=False)
    assert not kv_only.weights.tensors
    checkpoint = checkpoint_weights_digest(zoo.make_model("llama"))
    assert family.snapshot.model.weights_digest == checkpoint and family.snapshot.weights.tensors
    assert kv_only.model.weights_digest == kv_only.weights.ref.weights_digest == checkpoint


def test_weights_travel_with_the_snapshot(thaw_sglang, family, given_back):
    """Other weights loaded through the restore change the continuation; the parent's bring it back."""
    child, prompt = given_back(1), family.continued_prefix + SUFFIXES[1]
    kv_only = thaw_sglang.capture(child, include_weights=False)

    other = _other_weights(family.snapshot, seed=1)
    thaw_sglang.restore(child, other)
    _, _, weights = _state(thaw_sglang, child)
    assert weights == {name: bytes(t.data) for name, t in other.weights.tensors.items()}
    output, cached = generate(child, prompt)
    assert cached == family.restored_prefix_len and output != family.references[1]
    # The engine's weights are now the snapshot's, and so is their identity.
    assert thaw_sglang.capture(child, include_weights=False).model.weights_digest == other.model.weights_digest

    before = _state(thaw_sglang, child)
    with pytest.raises(IncompatibleSnapshotError, match="model.weights_digest"):
        thaw_sglang.restore(child, kv_only)  # KV computed with weights this engine no longer has
    assert _state(thaw_sglang, child) == before

    thaw_sglang.restore(child, family.snapshot)
    _, _, weights = _state(thaw_sglang, child)
    assert weights == {name: bytes(t.data) for name, t in family.snapshot.weights.tensors.items()}
    assert generate(child, prompt) == (family.references[1], family.restored_prefix_len)
    thaw_sglang.restore(child, kv_only)  # the checkpoint's weights are back: KV computed with them fits again
    assert child.leak_warnings() == 0


def test_weights_the_engine_holds_are_not_loaded_again(thaw_sglang, family, given_back):
    """Another engine's snapshot of the same checkpoint carries the weights under that engine's names: under
    this engine's weights digest only the KV moves; under another digest the unknown names are refused."""
    child, prompt = given_back(1), family.continued_prefix + SUFFIXES[1]
    renamed = {f"other_engine.{name}": t for name, t in family.snapshot.weights.tensors.items()}
    foreign = dataclasses.replace(family.snapshot, weights=dataclasses.replace(
        family.snapshot.weights, tensors=renamed, checkpoint_names={}))
    thaw_sglang.restore(child, foreign)
    assert generate(child, prompt) == (family.references[1], family.restored_prefix_len)
    with pytest.raises(IncompatibleSnapshotError, match="weights: the snapshot lacks parameters"):
        thaw_sglang.restore(child, _model(foreign, weights_digest="sha256:" + "1" * 64))
    assert child.leak_warnings() == 0


def _model(snapshot, **changes):
    return dataclasses.replace(snapshot, model=dataclasses.replace(snapshot.model, **changes))


def _kv_layers(snapshot, layers, **kv_changes):
    return dataclasses.replace(snapshot, kv=dataclasses.replace(snapshot.kv, layers=layers, **kv_changes))


def _reshaped_kv(snapshot, convert, *, dtype=None, **layer_changes):
    """Every K/V tensor passed through `convert`, the cache and layer descriptions changed to match."""
    layers = [
        dataclasses.replace(
            layer,
            tensors={role: from_torch(convert(to_torch(t))) for role, t in layer.tensors.items()},
            **layer_changes,
        )
        for layer in snapshot.kv.layers
    ]
    return _kv_layers(snapshot, layers, dtype=dtype or snapshot.kv.dtype)


def _resized_weight(snapshot, name):
    tensor = snapshot.weights.tensors[name]
    half = Tensor(tensor.dtype, (tensor.shape[0] // 2, *tensor.shape[1:]), tensor.data[: tensor.nbytes // 2])
    tensors = {**snapshot.weights.tensors, name: half}
    return dataclasses.replace(
        snapshot,
        model=dataclasses.replace(snapshot.model, weights_digest=weights_digest(tensors)),
        weights=dataclasses.replace(snapshot.weights, tensors=tensors),
    )


MISMATCHES = {
    "model.architecture": lambda s: _model(s, architecture="Qwen2ForCausalLM"),
    "model.config_digest": lambda s: _model(s, config_digest="sha256:" + "0" * 64),
    "model.dtype": lambda s: _model(s, dtype="bfloat16"),
    r"kv.layers \(count\)": lambda s: _kv_layers(s, s.kv.layers[:1]),
    "kv.dtype": lambda s: _reshaped_kv(s, lambda t: t.to(torch.bfloat16), dtype="bfloat16"),
    r"kv.layers\[0\].num_kv_heads": lambda s: _reshaped_kv(s, lambda t: torch.cat([t, t], dim=2), num_kv_heads=4),
    r"kv.layers\[0\].head_dim": lambda s: _reshaped_kv(s, lambda t: torch.cat([t, t], dim=3), head_dim=64),
    r"weights\['lm_head.weight'\]": lambda s: _resized_weight(s, "lm_head.weight"),
}


def test_mismatches_are_refused_before_anything_changes(thaw_sglang, family):
    engine = family.children[3]
    before = _state(thaw_sglang, engine)
    for field, mismatch in MISMATCHES.items():
        with pytest.raises(IncompatibleSnapshotError, match=field):
            thaw_sglang.restore(engine, mismatch(family.snapshot))
    assert _state(thaw_sglang, engine) == before
    assert engine.leak_warnings() == 0


def _shm_entries(engine) -> list[str]:
    """The /dev/shm entries named after this engine's SGLang instance (other engines, of other test runs on the
    machine, make their own: only this engine's are counted)."""
    return sorted(name for name in os.listdir("/dev/shm")
                  if name.startswith("sglang") and engine.port_args.instance_id in name)


def test_shutting_down_one_fork_leaves_the_others_running(family, engines, given_back):
    """A fork of its own: the family's children serve other tests after this one. It leaves nothing in /dev/shm
    (SGLang's scheduler makes a load-report file there, `sglang_loads_<instance id>_<digest>.shm`, and never
    unlinks it: hundreds collected after test runs; thaw's scheduler unlinks its name at once, test_load_report)."""
    (fork,) = family.parent.fork(n=1)
    engines.adopt([fork])
    prompt = family.continued_prefix + SUFFIXES[0]
    output, cached = generate(fork, prompt)
    assert output == family.references[0] and cached >= family.restored_prefix_len  # the parent's tree, forked
    from thaw_sglang import rpc

    unlinked = rpc.call(fork, "thaw_unlinked_load_report_path")
    assert unlinked and fork.port_args.instance_id in os.path.basename(unlinked), \
        f"the scheduler unlinked no load-report file of its own: {unlinked!r}"  # else the checks below are vacuous
    assert _shm_entries(fork) == [], "the running engine's load-report file still has its name in /dev/shm"
    fork.shutdown()
    assert _shm_entries(fork) == [], "the shut-down engine left its SGLang files in /dev/shm"
    for engine in (family.parent, given_back(0)):
        assert generate(engine, family.continued_prefix + SUFFIXES[0])[0] == family.references[0]
        assert engine.leak_warnings() == 0


def test_params_that_are_not_sampling_params_are_refused_by_name(thaw_sglang, family):
    """generate(prompt, None) raised AttributeError (params.temperature), and differently on every engine."""
    engine = thaw_sglang.SGLangEngine(family.parent)
    for params in (None, {"max_tokens": 2}):
        for call in (engine.generate, engine.submit):
            with pytest.raises(TypeError, match=f"params must be a thaw_format.SamplingParams .*, not "
                                                f"{type(params).__name__}"):
                call(SUFFIXES[0], params)
    assert engine.queued == {} and engine.streaming is None
