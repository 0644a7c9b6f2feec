"""GPU byte mover and fork, side by side in one process on one GPU (run by scripts/gpu-check.sh):

- restore: host bytes -> GPU tensors through libthaw's pinned ring (every 1 MiB chunk CRC32C-checked on the
  host before its copy), from host memory and from a file in the page cache, against torch copying the same
  bytes host -> device from pinned memory (the ceiling; the target is >= 0.8 of it);
- capture: GPU -> host memory through the ring (checksums computed on the way), against torch device -> pinned;
- both again with the host buffer pinned first (_libthaw_cuda.pinned: the ring then copies straight from and
  into it, each chunk checked in place), and what pinning the buffer once costs;
- CRC32C GB/s of libthaw's thread pool on the same host bytes;
- fork of a Qwen2.5-0.5B-shaped model (random weights, bf16) holding an 8K-token trunk: thaw_transformers
  capture + restore of the trunk's KV into a fresh engine, and in-process fork, against re-prefilling the trunk.

Without a GPU it refuses to measure or write anything; `--dry-run` runs the planning and argument paths and the
fork path on a tiny config on the CPU, printing what it would measure and writing nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_seconds, command_line, write_results  # noqa: E402

CHUNK = 1 << 20
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=True)


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=4.0, help="bytes moved per restore/capture round")
    parser.add_argument("--regions", type=int, default=64, help="tensors the bytes are split into")
    parser.add_argument("--trunk", type=int, default=8192, help="tokens of the forked trunk")
    parser.add_argument("--name", default="gpu_h200", help="results file stem: benchmarks/results/<name>.json|md")
    parser.add_argument("--ring", type=ring_setting, action="append",
                        help="pinned ring as SLOTSxMIB (e.g. 8x64), repeatable: thaw's rows for each; default the "
                             "library's own")
    parser.add_argument("--dry-run", action="store_true", help="plan and exercise the paths on CPU; write nothing")
    args = parser.parse_args(argv)
    if not args.name.startswith("gpu_"):
        parser.error("--name must start with gpu_ (GPU figures only)")
    if args.gib <= 0 or args.regions < 1 or args.trunk < 1:
        parser.error("--gib, --regions and --trunk must be positive")
    return args


def ring_setting(text: str) -> tuple[int, int]:
    """'SLOTSxMIB' -> (slots, MiB): 2 to 8 slots (the ring's own bounds) of at least 1 MiB."""
    try:
        slots, mib = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not SLOTSxMIB, e.g. 8x64") from None
    if not 2 <= slots <= 8 or mib < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: slots must be 2 to 8 and MiB at least 1")
    return slots, mib


def region_sizes(total: int, regions: int) -> list[int]:
    """Unequal tensor sizes (like a model's) adding up to total: region i gets a share growing with i."""
    weights = [1 + i % 7 for i in range(regions)]
    sizes = [total * w // sum(weights) for w in weights]
    sizes[-1] += total - sum(sizes)
    return sizes


def plan_summary(sizes: list[int]) -> dict:
    from thaw_format import _libthaw_cuda

    plan = _libthaw_cuda.stage_plan(sizes, [CHUNK] * len(sizes))
    return {"bytes": sum(sizes), "regions": len(sizes), "pieces": len(plan),
            "slots": len({p[3] for p in plan}), "slot_bytes": _libthaw_cuda.SLOT_BYTES}


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2)


def movers(torch, sizes: list[int], rings: list[tuple[int, int]]) -> dict:
    """GB/s of each way of moving the bytes, measured in this process; thaw's through each (slots, MiB) ring."""
    from thaw_format import _libthaw_cuda, mover

    total = sum(sizes)
    host = torch.randint(0, 256, (total,), dtype=torch.uint8).numpy()
    pinned = torch.from_numpy(host).pin_memory()
    tensors = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sizes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    device_copy = torch.empty(total, dtype=torch.uint8, device="cuda")

    def torch_h2d():
        device_copy.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()

    def torch_d2h():
        pinned.copy_(device_copy, non_blocking=True)
        torch.cuda.synchronize()

    pageable = torch.from_numpy(host)  # what a plain .to() / .cpu() copies from and to

    def torch_pageable_h2d():
        device_copy.copy_(pageable)
        torch.cuda.synchronize()

    def torch_pageable_d2h():
        pageable.copy_(device_copy)
        torch.cuda.synchronize()

    device_copy.copy_(pinned)
    captured = bytearray(total)
    write_specs = [(o, t.data_ptr(), n, CHUNK) for o, t, n in zip(offsets, tensors, sizes)]
    for t, o, n in zip(tensors, offsets, sizes):
        t.copy_(device_copy[o:o + n])
    crcs = _libthaw_cuda.write_regions(captured, write_specs)
    assert bytes(captured) == host.tobytes(), "capture through the ring changed bytes"
    read_specs = [(o, t.data_ptr(), n, CHUNK, k) for o, t, n, k in zip(offsets, tensors, sizes, crcs)]
    with tempfile.NamedTemporaryFile(dir=os.environ.get("THAW_BENCH_DIR")) as f:
        f.write(captured)
        f.flush()
        seconds = {
            "torch pinned host->device": best_seconds(torch_h2d)[0],
            "torch pageable host->device": best_seconds(torch_pageable_h2d)[0],
            "torch device->pinned host": best_seconds(torch_d2h)[0],
            "torch device->pageable host": best_seconds(torch_pageable_d2h)[0],
        }
        default = _libthaw_cuda.SLOTS, _libthaw_cuda.SLOT_BYTES
        for slots, mib in rings:  # the ring's settings are module globals, read at each call
            _libthaw_cuda.SLOTS, _libthaw_cuda.SLOT_BYTES = slots, mib << 20
            ring = f"ring {slots}x{mib} MiB"
            seconds.update({
                f"thaw restore from host memory (CRC-checked, {ring})": best_seconds(
                    lambda: _libthaw_cuda.read_regions(captured, read_specs))[0],
                f"thaw restore from file, page cache (CRC-checked, {ring})": best_seconds(
                    lambda: _libthaw_cuda.read_regions(f.fileno(), read_specs))[0],
                f"thaw capture to host memory (CRCs computed, {ring})": best_seconds(
                    lambda: _libthaw_cuda.write_regions(captured, write_specs))[0],
            })
            assert _libthaw_cuda.read_regions(f.fileno(), read_specs) is None
        _libthaw_cuda.SLOTS, _libthaw_cuda.SLOT_BYTES = default
        start = time.perf_counter()
        with _libthaw_cuda.pinned(captured):  # the ring copies straight from and into it: no slot
            pinning = time.perf_counter() - start
            seconds["thaw restore from pinned host memory (CRC-checked in place)"] = best_seconds(
                lambda: _libthaw_cuda.read_regions(captured, read_specs))[0]
            seconds["thaw capture to pinned host memory (CRCs computed in place)"] = best_seconds(
                lambda: _libthaw_cuda.write_regions(captured, write_specs))[0]
            start = time.perf_counter()
        seconds["pinning the host buffer once (register + unregister)"] = pinning + time.perf_counter() - start
        assert bytes(captured) == host.tobytes(), "capture into pinned memory changed bytes"
        seconds["libthaw CRC32C (thread pool)"] = best_seconds(lambda: mover.chunk_crcs(host, CHUNK))[0]
    device_copy.copy_(pinned)
    assert all(torch.equal(t, device_copy[o:o + n]) for t, o, n in zip(tensors, offsets, sizes))
    return {name: gbps(total, s) for name, s in seconds.items()}


def fork_versus_prefill(torch, config: dict, trunk: int, device: str, dtype) -> dict:
    """Seconds to re-prefill the trunk, to capture + restore its KV into a fresh engine, and to fork in-process."""
    import transformers

    from thaw_transformers import TransformersEngine

    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config)).to(dtype).to(device).eval()
    tokens = torch.randint(0, config["vocab_size"], (trunk,), generator=torch.Generator().manual_seed(0)).tolist()

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - start

    parent = TransformersEngine(model)
    parent._hold(tokens[:16])  # warm-up: kernels and allocator
    parent = TransformersEngine(model, info=parent.info)
    _, prefill = timed(lambda: parent._hold(tokens))
    snapshot, capture = timed(lambda: parent.capture(include_weights=False))
    child = TransformersEngine(model, info=parent.info)
    _, restore = timed(lambda: child.restore(snapshot))
    _, fork = timed(lambda: parent.fork(4, context=tokens))
    assert child.cache.match(tokens, trunk)[1] == parent.cache.match(tokens, trunk)[1] > 0
    return {"trunk_tokens": trunk, "re-prefill s": round(prefill, 4), "capture s": round(capture, 4),
            "restore s": round(restore, 4), "in-process fork of 4 s": round(fork, 4),
            "restore speed-up over re-prefill": round(prefill / restore, 1)}


def main(argv=None) -> int:
    args = arguments(argv)
    sizes = region_sizes(int(args.gib * (1 << 30)), args.regions)
    import torch

    if args.dry_run:
        print("plan:", plan_summary(sizes))
        print("would measure: restore, capture, CRC32C GB/s on these bytes; fork of Qwen2.5-0.5B shape,",
              f"bf16, {args.trunk}-token trunk, against re-prefill")
        print("fork path on a tiny config, CPU:", fork_versus_prefill(torch, TINY, 48, "cpu", torch.float32))
        print("dry run: nothing written")
        return 0
    from thaw_format import _libthaw_cuda

    reason = None if torch.cuda.is_available() else "torch sees no CUDA GPU"
    reason = reason or _libthaw_cuda.unavailable_reason()
    if reason:
        print(f"bench_gpu: refusing to measure or write GPU figures: {reason}", file=sys.stderr)
        return 2
    rates = movers(torch, sizes, args.ring or [(_libthaw_cuda.SLOTS, _libthaw_cuda.SLOT_BYTES >> 20)])
    fork = fork_versus_prefill(torch, QWEN25_05B, args.trunk, "cuda", torch.bfloat16)
    ceiling_in, ceiling_out = rates["torch pinned host->device"], rates["torch device->pinned host"]
    table = [["what", "GB/s", "of torch's pinned copy"]]
    for name, rate in rates.items():
        ceiling = ceiling_out if "capture" in name or "device->" in name else ceiling_in
        table.append([name, f"{rate}", "" if name.startswith(("libthaw CRC32C", "pinning")) else f"{rate / ceiling:.2f}"])
    table += [["fork: " + k, str(v), ""] for k, v in fork.items()]
    gpu = torch.cuda.get_device_name()
    write_results(args.name, f"GPU byte mover and fork on {gpu}", command_line(),
                  {"gpu": gpu, "cuda": torch.version.cuda, "torch": torch.__version__, "plan": plan_summary(sizes),
                   "gbps": rates, "fork": fork},
                  table, [f"GPU: {gpu}, CUDA {torch.version.cuda}, torch {torch.__version__}. Restore target: >= 0.8 "
                          "of torch's pinned host->device copy of the same bytes in the same run."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
