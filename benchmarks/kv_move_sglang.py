"""bench_kv_move.py's SGLang side: the same measurements on a ThawEngine (SGLang's scheduler in its own process).

    .venv-sglang/bin/python benchmarks/bench_kv_move.py --engine sglang [--tokens 4096] [--rounds 9]

SGLang always runs its scheduler (which holds the KV) in a subprocess, so its one mode ("scheduler") is vLLM's
multiprocessing mode: capture is the client's thaw_sglang.capture (the scheduler gathers the KV by token slot
straight into shared memory with its checksums; the client's Snapshot views it), restore hands a snapshot back
to the scheduler (verified in place, then scattered into the slots; one in the client's own memory is written
into the engine's restore segment with its checksums and scattered without a second check), capture_shared /
restore_source are the KV-only pair a fork pool uses.
"""

from __future__ import annotations

import gc
import os
import random
import time

from bench_kv_move import time_kv_paths

VERSION = "sglang 0.5.23 (CPU, torch_native attention)"
NOTES = (
    f"{VERSION}; KV-heavy tiny Llama (8 layers, 8 KV heads x 128, float32, 64 KiB KV per token), {{tokens}}-token "
    "trunk, held by the scheduler process in per-layer token-slot buffers [slot, kv_heads, head_dim]. Capture and "
    "restore are whole client calls: the RPC to the scheduler, the radix tree as pages, libthaw's gather by slot "
    "with CRC32C straight into shared memory (capture; the client's Snapshot views it), and on restore (of that "
    "capture: its own segment, handed back) the flush, libthaw's scatter into fresh slots and SGLang's own tree "
    "insert; no chunk is verified again, in any restore row: the client's and its engine's memory is trusted, "
    "bytes are verified where they come in (thaw_format.sdk.lent's trust rule). Restore encoded is a snapshot "
    "loaded from a file with thaw_format.load, whose KV the scheduler reads from the client's memory "
    "(process_vm_readv) and scatters in the same pass (thaw_format.sdk.remote, chosen by "
    "thaw_format.sdk.lent.send; where the system refuses the read, it is copied into the client's reused segment "
    "first); restore loaded shared one loaded with load(path, shared=True), verified as it was read, whose own "
    "segment the scheduler reads in place (as a lent capture's): its first restore also maps the segment into "
    "the scheduler (page faults, 4 KiB pages). Both rows sit near what the kernel allows here: the remote read "
    "is the kernel's copy (process_vm_readv): the scatter through it runs at 0.63-0.74 of a memcpy in a bare "
    "loop on both CPUs (a read straight into the slots saved CPU only in a bare loop into huge pages; in the "
    "scheduler it cost more: HISTORY), and the first "
    "map of 256 MiB of 4 KiB shared-memory pages costs about 4,100 faults of 16 pages each, which a bulk "
    "prefault (MADV_POPULATE_READ, MAP_POPULATE) took longer to do. restore_source verifies every chunk of the "
    "source string it is given. Peak RSS rise sums the high-water marks of the client and its descendants (the "
    "scheduler); a shared-memory segment mapped by two counts in both."
)


def measure(mode: str, model: str, tokens: int, rounds: int) -> dict:
    if mode != "scheduler":
        raise SystemExit(f"SGLang has one mode, 'scheduler' (its scheduler runs in a subprocess), not {mode!r}")
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    import thaw_sglang

    engine = thaw_sglang.SGLangEngine.start(
        model_path=model, device="cpu", load_format="safetensors", skip_tokenizer_init=True,
        attention_backend="torch_native", dtype="float32", random_seed=0, disable_cuda_graph=True,
        max_total_tokens=tokens + 256)
    thaw = engine.engine
    trunk = [random.Random(0).randrange(3, 1000) for _ in range(tokens)]
    one = {"temperature": 0.0, "max_new_tokens": 1, "ignore_eos": True}
    thaw.generate(input_ids=trunk[:64], sampling_params=one)  # warm-up
    thaw.flush_cache()
    start = time.perf_counter()
    thaw.generate(input_ids=trunk, sampling_params=one)
    prefill = time.perf_counter() - start
    engine.model_info()  # the weights digest is computed once per engine, not per capture

    def cached_after_restore() -> None:
        out = thaw.generate(input_ids=trunk + [5], sampling_params=one)
        if out["meta_info"]["cached_tokens"] != tokens:
            raise SystemExit(f"after restore SGLang reports {out['meta_info']['cached_tokens']} cached tokens")
        if thaw.leak_warnings():
            raise SystemExit("SGLang's pool-leak check fired after the restores")

    run = time_kv_paths(mode, trunk, prefill, engine, cached_after_restore,
                        capture=lambda: thaw_sglang.capture(thaw, include_weights=False, chains=[trunk]),
                        restore=lambda snapshot: thaw_sglang.restore(thaw, snapshot), rounds=rounds)
    engine.close()
    gc.collect()
    return run
