"""MLX: KV capture and restore against a memory copy, and against mlx-lm's own prompt-cache files.

    .venv/bin/python benchmarks/bench_kv_mlx.py [--tokens 4096]

A prompt cache of the KV-heavy tiny Llama (8 layers, 8 KV heads x 128, float32: 64 KiB per token; 4,096
tokens = 256 MiB), KV only, model identity computed once. Side by side in one process, best of 3:
  memcpy:   numpy copy of the KV's bytes;
  capture:  thaw_mlx.capture (KV gathered into token-major pages) / restore: thaw_mlx.restore (+ mx.eval);
  file:     capture + thaw_format.save vs mlx_lm save_prompt_cache; thaw_format.load (checksums verified) +
            restore vs mlx_lm load_prompt_cache (+ mx.eval), files on local disk, page cache hot.
Writes benchmarks/results/kv_move_mlx.json and .md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import best_of, command_line, write_results

CONFIG = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 8, "intermediate_size": 256,
          "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
          "vocab_size": 1024, "rope_theta": 10000.0, "tie_word_embeddings": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm.models import cache as mlx_cache
    from mlx_lm.models.llama import Model, ModelArgs

    import thaw_format
    import thaw_mlx

    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(CONFIG))
    info = thaw_mlx.model_info(model)
    prompt_cache = mlx_cache.make_prompt_cache(model)
    shape = (1, CONFIG["num_key_value_heads"], args.tokens, CONFIG["head_dim"])
    for layer in prompt_cache:
        layer.update_and_fetch(mx.random.normal(shape), mx.random.normal(shape))
    mx.eval([c.state for c in prompt_cache])
    tokens = list(range(3, 3 + args.tokens))
    kv_bytes = sum(c.keys[..., : args.tokens, :].nbytes + c.values[..., : args.tokens, :].nbytes for c in prompt_cache)

    def capture():
        return thaw_mlx.capture(model, prompt_cache, tokens, include_weights=False, info=info)

    def restore(snapshot):
        cache = thaw_mlx.restore(model, snapshot, info=info)
        mx.eval([c.state for c in cache])
        return cache

    snapshot = capture()
    restored = restore(snapshot)
    for a, b in zip(prompt_cache, restored):  # the round trip is exact
        n = args.tokens
        assert bytes(memoryview(mx.contiguous(a.keys[..., :n, :]))) == bytes(memoryview(mx.contiguous(b.keys[..., :n, :])))
    src, dst = np.ones(kv_bytes, np.uint8), np.zeros(kv_bytes, np.uint8)
    memcpy = best_of(lambda: np.copyto(dst, src))
    del src, dst
    capture_s = best_of(capture)
    restore_s = best_of(lambda: restore(snapshot))

    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1] / ".cache") as tmp:
        ours, theirs = Path(tmp) / "cache.thaw", Path(tmp) / "cache.safetensors"
        save_ours = best_of(lambda: thaw_format.save(capture(), ours))
        save_theirs = best_of(lambda: mlx_cache.save_prompt_cache(str(theirs), prompt_cache))
        load_ours = best_of(lambda: restore(thaw_format.load(ours)))
        load_theirs = best_of(lambda: mx.eval([c.state for c in mlx_cache.load_prompt_cache(str(theirs))]))

    data = {"tokens": args.tokens, "kv_bytes": kv_bytes, "memcpy_s": memcpy, "capture_s": capture_s,
            "restore_s": restore_s, "capture_vs_memcpy": memcpy / capture_s, "restore_vs_memcpy": memcpy / restore_s,
            "save_thaw_s": save_ours, "save_mlx_lm_s": save_theirs, "load_thaw_s": load_ours,
            "load_mlx_lm_s": load_theirs, "save_ratio": save_theirs / save_ours, "load_ratio": load_theirs / load_ours}
    gb = kv_bytes / 1e9
    table = [["operation", "seconds", "GB/s", "ratio (>1: thaw faster)"],
             ["memcpy of the KV bytes (numpy, one thread)", f"{memcpy:.4f}", f"{gb / memcpy:.2f}", ""],
             ["thaw_mlx.capture (KV only)", f"{capture_s:.4f}", f"{gb / capture_s:.2f}", f"{memcpy / capture_s:.2f} of memcpy"],
             ["thaw_mlx.restore (+ mx.eval)", f"{restore_s:.4f}", f"{gb / restore_s:.2f}", f"{memcpy / restore_s:.2f} of memcpy"],
             ["capture + thaw_format.save", f"{save_ours:.4f}", f"{gb / save_ours:.2f}", f"{save_theirs / save_ours:.2f}x"],
             ["mlx_lm save_prompt_cache", f"{save_theirs:.4f}", f"{gb / save_theirs:.2f}", ""],
             ["thaw_format.load (verified) + restore", f"{load_ours:.4f}", f"{gb / load_ours:.2f}", f"{load_theirs / load_ours:.2f}x"],
             ["mlx_lm load_prompt_cache (+ mx.eval)", f"{load_theirs:.4f}", f"{gb / load_theirs:.2f}", ""]]
    notes = [f"mlx {mx.__version__} (CPU), mlx-lm prompt cache of {args.tokens} tokens, 8 layers x 8 KV heads x 128, "
             f"float32 ({kv_bytes / 2**20:.0f} MiB of KV), KV only, identity computed once. thaw's save is atomic "
             "(fsync of file and directory) and writes a CRC32C per 1 MiB chunk; its load verifies each. Targets: "
             "capture and restore >= 0.5 of memcpy; save and load >= 1.0x mlx-lm's. The machine is shared by "
             "several sessions: see the load average."]
    write_results("kv_move_mlx", "MLX: KV capture and restore against memcpy and mlx-lm's prompt-cache files",
                  command_line(), data, table, notes)


if __name__ == "__main__":
    main()
