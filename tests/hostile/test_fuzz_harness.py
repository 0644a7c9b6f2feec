"""The atheris harnesses' checks run in the suite too, without atheris: over every committed hostile file and
golden vector, and over a fixed set of random mutations of them (a short, uninstrumented fuzz run)."""

import importlib.util
import random
from pathlib import Path

import pytest

from hostile import craft

ROOT = Path(__file__).resolve().parents[2]
SEEDS = sorted((ROOT / "tests/hostile/corpus").glob("*.thaw")) + sorted((ROOT / "spec/vectors").glob("*.thaw"))
MUTATIONS = 2000


def load_harness(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"fuzz/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness():
    return load_harness("fuzz_reader")


def test_harness_accepts_every_seed(harness):
    assert len(SEEDS) > 70
    for seed in SEEDS:
        harness.check(seed.read_bytes())


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(4)
        at = rng.randrange(len(data) + 1)
        if kind == 0 and data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data[at : at + 8] = rng.choice([b"\0" * 8, b"\xff" * 8, rng.randbytes(8), (2**63).to_bytes(8, "little")])
        elif kind == 2:
            del data[at : at + rng.randint(1, 64)]
        else:
            source = rng.randrange(len(data) + 1)
            data[at:at] = data[source : source + rng.randint(1, 64)]
    return bytes(data)


def test_harness_survives_random_mutations(harness):
    rng = random.Random(20261123)
    seeds = [s.read_bytes() for s in SEEDS if s.stat().st_size <= 65536]
    for _ in range(MUTATIONS):
        harness.check(mutate(rng.choice(seeds), rng))


def test_repair_reaches_past_the_checksums():
    data = bytearray(craft.sample_bytes())
    data[craft.where(data).json_start + 2] ^= 0x01  # "tensors" -> "tensorr" style damage inside the document
    data[5000] ^= 0x01  # and one data byte
    repaired = craft.repair(data)
    assert repaired != bytes(data) and craft.header_length(repaired) == craft.header_length(data)
    assert craft.repair(repaired) == repaired


def test_document_harness_over_its_seeds_and_mutations(tmp_path):
    harness = load_harness("fuzz_document")
    harness.write_seeds(tmp_path)
    seeds = [p.read_bytes() for p in sorted(tmp_path.iterdir())]
    assert len(seeds) > 60
    rng = random.Random(8)
    for data in seeds + [mutate(rng.choice(seeds), rng) for _ in range(MUTATIONS)]:
        harness.check(data)
