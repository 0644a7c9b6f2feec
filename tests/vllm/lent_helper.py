"""New-process side of test_lent_kv: a vLLM engine in its default multiprocessing mode (client, engine core and
worker in three processes), driven through VLLMEngine; reports one "THAW_RESULT <json>" line.

argv[1] is JSON: model, dtype, engine_kwargs, trunk, other, suffix (token ids), max_tokens.
"""

import dataclasses
import gc
import glob
import hashlib
import json
import os
import sys
import tempfile
import time


def kv_digest(snapshot) -> str:
    h = hashlib.sha256()
    for layer in snapshot.kv.layers:
        for role in ("k", "v"):
            h.update(layer.tensors[role].data)
    return h.hexdigest()


def flip_kv_bit(data) -> None:
    """Flip one bit inside layer 0's K (its first checksum chunk) in a snapshot's writable bytes."""
    import thaw_format

    region = thaw_format.SnapshotFile(data).info("kv/0/k")[2]
    data[region.offset + 1000] ^= 0x40


def corrupt_first_kv_chunk(source: str) -> None:
    """flip_kv_bit in the segment a source names."""
    import mmap
    import os

    from _posixshmem import shm_open

    name, _, nbytes = source[len("shm://"):].partition("#")
    fd = shm_open("/" + name, os.O_RDWR, mode=0)
    try:
        with mmap.mmap(fd, int(nbytes)) as mapping:
            flip_kv_bit(mapping)
    finally:
        os.close(fd)


def refuse_memory_reads() -> None:
    """Give up CAP_SYS_PTRACE (effective, permitted and for every child) and become not dumpable: a process started
    from here may no longer read this one's memory."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_DUMPABLE, PR_CAPBSET_DROP, CAP_SYS_PTRACE = 4, 24, 19
    header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()  # capget/capset version 3
    assert libc.capget(header, data) == 0
    data[0] &= ~(1 << CAP_SYS_PTRACE)
    data[1] &= ~(1 << CAP_SYS_PTRACE)
    assert libc.prctl(PR_CAPBSET_DROP, CAP_SYS_PTRACE, 0, 0, 0) == 0 and libc.capset(header, data) == 0
    assert libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0


def main() -> None:
    config = json.loads(sys.argv[1])
    import thaw_format
    from thaw_format import SamplingParams
    from thaw_format.sdk import lent
    from thaw_vllm import VLLMEngine

    engine = VLLMEngine.start(config["model"], dtype=config["dtype"], **config["engine_kwargs"])
    trunk, other, suffix = config["trunk"], config["other"], config["suffix"]
    greedy = SamplingParams(max_tokens=config["max_tokens"], temperature=0.0, ignore_eos=True)
    result = {"fresh": {}, "after": {}}

    def serve(name: str, prompt, into: str) -> None:
        out = engine.generate(prompt, greedy)
        result[into][name] = [out.token_ids, out.cached_tokens]

    serve("trunk", trunk + suffix, "fresh")
    serve("other", other + suffix, "fresh")  # both now cached: captures below take their chains
    held = engine.capture(include_weights=False, chains=[trunk])
    held_digest = kv_digest(held)
    again = engine.capture(include_weights=False, chains=[other])
    result["held_unchanged"] = kv_digest(held) == held_digest
    result["segments"] = [lent.lent_source(held), lent.lent_source(again)]
    del again
    gc.collect()

    engine.restore(held)  # the lent segment goes back to the worker untouched
    serve("trunk", trunk + suffix, "after")
    source = engine.capture_shared(chains=[trunk])
    engine.llm.reset_prefix_cache()  # the engine now holds nothing
    serve("empty", other + suffix, "after")
    engine.restore_source(source)
    serve("shared", trunk + suffix, "after")

    corrupt = engine.capture_shared(chains=[trunk])
    corrupt_first_kv_chunk(corrupt)
    try:
        engine.restore_source(corrupt)
        result["corrupt_error"] = None
    except Exception as exc:  # noqa: BLE001 - reported, with its class, for the test to check
        result["corrupt_error"] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    serve("after_corrupt", trunk + suffix, "after")

    # A snapshot loaded from a file into shared memory (load(path, shared=True)) goes to the worker as its own
    # segment, no copy in this client; the file is corrupted and deleted after the load: the snapshot holds the
    # bytes the load verified. A load of the corrupted file is refused, naming the chunk, before any engine call.
    path = os.path.join(tempfile.mkdtemp(), "kv.thaw")
    thaw_format.save(held, path)
    loaded = thaw_format.load(path, shared=True)
    result["loaded_is_its_segment"] = lent.lent_source(loaded) is not None
    with thaw_format.open(path) as f:
        offset = f.info("kv/0/k")[2].offset
    with open(path, "r+b") as f:
        f.seek(offset + 1000)
        byte = f.read(1)[0]
        f.seek(offset + 1000)
        f.write(bytes([byte ^ 0x40]))
    try:
        thaw_format.load(path, shared=True)
        result["corrupt_file_error"] = None
    except Exception as exc:  # noqa: BLE001 - reported, with its class, for the test to check
        result["corrupt_file_error"] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    # Loaded with verify=False, the corrupt file's segment is the one the client did not check: the worker verifies
    # it (thaw_format.sdk.lent's trust rule) and refuses it before the engine changes.
    unverified = thaw_format.load(path, shared=True, verify=False)
    try:
        engine.restore(unverified)
        result["unverified_error"] = None
    except Exception as exc:  # noqa: BLE001 - reported, with its class, for the test to check
        result["unverified_error"] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    del unverified
    # A segment borrowed with verify=False from a source string that is not this engine's capture: the worker
    # verifies it too. (The engine's own capture, `held`, is sent as checked.)
    result["capture_checked"] = lent.send(engine.llm, held)[1]
    lender = lent.Lender()
    borrowed_source = lender.publish(held)
    corrupt_first_kv_chunk(borrowed_source)
    try:
        engine.restore(lent.borrow(borrowed_source, verify=False))
        result["borrowed_error"] = None
    except Exception as exc:  # noqa: BLE001 - reported, with its class, for the test to check
        result["borrowed_error"] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    lender.close()
    os.remove(path)
    engine.llm.reset_prefix_cache()
    engine.restore(loaded)
    serve("loaded", trunk + suffix, "after")
    result["loaded_kv_identical"] = kv_digest(engine.capture(include_weights=False, chains=[trunk])) == held_digest
    del loaded

    # A snapshot loaded into this client's own memory (no shared memory) is read by the worker from this client's
    # memory (process_vm_readv) and scattered in the same pass.
    path = os.path.join(tempfile.mkdtemp(), "plain.thaw")
    thaw_format.save(held, path)
    plain = thaw_format.load(path)
    os.remove(path)
    result["plain_is_in_memory"] = lent.lent_source(plain) is None
    engine.llm.reset_prefix_cache()
    engine.restore(plain)
    result["plain_sent"] = lent.last_sent(engine.llm)
    serve("plain", trunk + suffix, "after")
    result["plain_kv_identical"] = kv_digest(engine.capture(include_weights=False, chains=[trunk])) == held_digest

    # this engine's worker's lenders only: other processes on the machine lend too ("thawlent_<pid>x<token>")
    worker = result["segments"][0][len("shm://"):].split("x", 1)[0]
    lent_names = sorted(glob.glob(f"/dev/shm/{worker}x*"))
    del held
    gc.collect()
    engine.close()
    time.sleep(1.0)
    result["lent_while_open"] = lent_names
    result["lent_after_close"] = sorted(glob.glob(f"/dev/shm/{worker}x*"))

    # Where the system refuses the worker a read of this client's memory, the restore goes through the engine's
    # restore segment, with no error, and so does every later one: a new engine's processes without
    # CAP_SYS_PTRACE, and this client not dumpable (what a container's Yama or seccomp policy does).
    refuse_memory_reads()
    engine = VLLMEngine.start(config["model"], dtype=config["dtype"], **config["engine_kwargs"])
    for attempt in ("refused", "again"):
        engine.restore(plain)
        result[f"{attempt}_sent"] = lent.last_sent(engine.llm)
        serve(attempt, trunk + suffix, "after")
        result[f"{attempt}_kv_identical"] = kv_digest(engine.capture(include_weights=False, chains=[trunk])) == held_digest
        engine.llm.reset_prefix_cache()
    # The restore segment holds the snapshot encoded again, under an id of its own: the worker records the client's
    # snapshot's, the lineage parent of its captures (none for one never saved, the file's for one in 64 KiB chunks).
    path = os.path.join(tempfile.mkdtemp(), "small-chunks.thaw")
    thaw_format.save(dataclasses.replace(plain), path, chunk_size=1 << 16)
    sent = {"never saved": dataclasses.replace(plain, id=None), "64 KiB chunks": thaw_format.load(path)}
    os.remove(path)
    result["parents"] = {}
    for name, snapshot in sent.items():
        engine.restore(snapshot)
        parent = engine.capture(include_weights=False, chains=[trunk]).lineage.parent
        result["parents"][name] = [lent.last_sent(engine.llm), snapshot.id, parent]
        engine.llm.reset_prefix_cache()
    engine.close()
    print("THAW_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
