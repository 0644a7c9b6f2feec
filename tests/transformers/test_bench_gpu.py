"""benchmarks/bench_gpu.py does not rot on CPU machines: its dry run plans the transfers and runs the fork path
on a tiny config without writing, and without a GPU it refuses to measure or write GPU figures."""

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_gpu  # noqa: E402


def results():
    return sorted((BENCHMARKS / "results").glob("gpu_*"))


def test_dry_run_plans_and_forks_on_cpu_and_writes_nothing(capsys):
    before = results()
    assert bench_gpu.main(["--dry-run", "--gib", "0.01", "--regions", "5", "--trunk", "64"]) == 0
    out = capsys.readouterr().out
    assert "'regions': 5" in out and "'pieces': 5" in out and "nothing written" in out
    assert "restore speed-up over re-prefill" in out
    assert results() == before


def test_region_sizes_add_up():
    sizes = bench_gpu.region_sizes(10**9 + 7, 13)
    assert sum(sizes) == 10**9 + 7 and len(sizes) == 13 and len(set(sizes)) > 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the refusal is for machines without one")
def test_refuses_gpu_figures_without_a_gpu(capsys):
    before = results()
    assert bench_gpu.main(["--gib", "0.001"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert results() == before


def test_results_name_must_say_gpu():
    with pytest.raises(SystemExit):
        bench_gpu.arguments(["--name", "crc32c"])
