"""Differential test: thaw_format and the independent reference decoder (spec/reference/decode.py, written from
the spec alone) agree on every corpus file and golden vector and on seeded mutations of them, raw and with their
checksums repaired: both accept, or both refuse with the same error class."""

import importlib.util
import random
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import thaw_format as tf
from hostile import craft
from hostile.test_fuzz_harness import SEEDS, mutate
from hostile.test_properties import DELETE, DOCUMENT, DOCUMENT_PATHS, PAYLOADS, json_values, replaced

ROOT = Path(__file__).resolve().parents[2]
MUTATIONS = 1500


def reference_decoder():
    spec = importlib.util.spec_from_file_location("thaw_reference_decode", ROOT / "spec/reference/decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = reference_decoder()


def verdicts(data: bytes, reference) -> tuple:
    try:
        tf.loads(data)
        tf.SnapshotFile(data).verify()
        ours = None
    except tf.SnapshotError as exc:
        ours = (type(exc).__name__, str(exc))
    try:
        reference.decode(data)
        theirs = None
    except reference.ThawError as exc:
        theirs = (type(exc).__name__, str(exc))
    return ours, theirs


def test_readers_agree():
    reference = REFERENCE
    rng = random.Random(17)
    seeds = [s.read_bytes() for s in SEEDS]
    inputs = list(seeds)
    for _ in range(MUTATIONS):
        mutated = mutate(rng.choice(seeds), rng)
        inputs += [mutated, craft.repair(mutated)]
    disagreements = []
    for data in inputs:
        ours, theirs = verdicts(data, reference)
        if (ours and ours[0]) == (theirs and theirs[0]):
            continue
        disagreements.append((ours, theirs))
    assert not disagreements, disagreements[:5]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(DOCUMENT_PATHS), new=json_values | st.just(DELETE) | st.integers(-3, 2**64))
def test_thaw_format_never_accepts_what_the_reference_refuses(path, new):
    """Section rules, one way: the reference decoder checks fewer member types (sampling parameters, KV layer
    roles) than thaw_format, so only "thaw_format is never laxer" is asserted over edited documents."""
    data = bytes(craft.container(replaced(DOCUMENT, path, new), PAYLOADS, optional=1))
    ours, theirs = verdicts(data, REFERENCE)
    assert not (ours is None and theirs), f"thaw_format accepts what the reference refuses: {theirs}"
