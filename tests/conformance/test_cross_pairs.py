"""Which engine pairs the cross-engine checks run: every ordered pair by default (the full product), or with
--cross-ring each engine into the next and the last into the first (CI's subset: every engine once a source and
once a target)."""

from thaw_conformance.cross import pairs

ENGINES = ["mlx", "vllm", "sglang", "transformers"]


def test_every_ordered_pair_by_default():
    made = pairs(ENGINES)
    assert len(made) == 12 and set(made) == {(a, b) for a in ENGINES for b in ENGINES if a != b}


def test_the_ring_has_each_engine_once_a_source_and_once_a_target():
    assert pairs(ENGINES, ring=True) == [("mlx", "vllm"), ("vllm", "sglang"), ("sglang", "transformers"),
                                         ("transformers", "mlx")]


def test_a_ring_of_two_is_both_ways_and_of_one_is_nothing():
    assert pairs(["mlx", "vllm"], ring=True) == [("mlx", "vllm"), ("vllm", "mlx")]
    assert pairs(["mlx"], ring=True) == [] and pairs([]) == []
