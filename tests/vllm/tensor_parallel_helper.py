"""New-process side of test_tensor_parallel: tensor-parallel (TP=2) engines, which need vLLM's thread binding set
before the process's first engine (vLLM caches its environment then): VLLM_CPU_OMP_THREADS_BIND, one CPU list per
rank, since the automatic binding wants a NUMA node per rank.

argv[1] is JSON: model, engine_kwargs, prompt (token ids), params (SamplingParams fields), suffix (token ids), tp1
(the path of a TP=1 engine's snapshot of the prompt's pages), midstream (two prompts), out (a directory). Two TP=2
engines, one after the other at work: the parent, and once it is done a ForkPool worker's started from its launch
spec (not beside it: each engine's ranks spin on both of the CPUs, and a TP step needs both ranks running). Steps,
the first three on the parent:
  capture: it generates the prompt and the prompt + suffix, describes itself and captures the prompt's pages with
          weights (saved as out/tp2.thaw); then it captures two requests mid-stream (greedy and seeded, a few
          tokens in), and runs them to the end;
  restore: it restores out/tp2.thaw, then the TP=1 snapshot with its ranks refused reads of this process's memory
          (they fall back on its restore segment); after each, its recapture of the prompt's pages is saved
          (out/tp2_in_tp2.thaw, out/tp1_in_tp2.thaw) and the prompt generated again; then it restores its own
          (lent) capture of those pages, and last the mid-stream capture, whose requests it runs to the end. The
          parent's blocks have held its requests' KV (vLLM's free queue puts a freed unhashed block at its head),
          but a restore resets the prefix cache first (core_ops._restore), so a recapture reads only blocks the
          restore wrote, and the TP=1 snapshot's bytes, which differ from anything a TP=2 engine computes, are
          read back (test_a_tp1_snapshot_restored_into_a_tp2_engine_is_its_bytes);
  corrupt: it is asked to restore a corrupt segment, a corrupt file, and a file other than the one whose structure
          planned the restore (as if replaced between reads): each refused; it serves on, its cache as it was;
  pool:   the pool's worker (a fresh TP=2 engine) forks the prompt + suffix from the parent.
Prints each stage's results as it finishes ("THAW_STAGE <name> <json>"), then one line "THAW_RESULT <json>".
"""

import json
import os
import sys

from lent_helper import corrupt_first_kv_chunk, flip_kv_bit


def main() -> None:
    config = json.loads(sys.argv[1])
    import thaw_format
    import thaw_vllm
    from thaw_format.sdk import ForkPool, lent, remote
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params, prompt, suffix, out = SamplingParams(**config["params"]), config["prompt"], config["suffix"], config["out"]

    def generate(llm, tokens):
        result = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)[0]
        return {"token_ids": list(result.outputs[0].token_ids), "num_cached_tokens": result.num_cached_tokens or 0}

    def recapture(llm, name):
        thaw_format.save(thaw_vllm.capture(llm, include_weights=False, chains=[prompt]), os.path.join(out, name))

    report = {}

    def finished(stage, *keys):
        print(f"THAW_STAGE {stage} " + json.dumps({key: report[key] for key in keys}), flush=True)

    parent = thaw_vllm.LLM(config["model"], **config["engine_kwargs"])
    report["parent"] = {"prompt": generate(parent, prompt), "continued": generate(parent, prompt + suffix)}
    report["describe"] = thaw_vllm.describe(parent)
    thaw_format.save(thaw_vllm.capture(parent, include_weights=True, chains=[prompt]), os.path.join(out, "tp2.thaw"))
    midstream, report["midstream"] = capture_midstream(parent, config)
    finished("capture", "parent", "describe", "midstream")

    report["restored"] = {}
    for name, path in (("tp2", os.path.join(out, "tp2.thaw")), ("tp1", config["tp1"])):
        publish, remote.publish = remote.publish, refused(remote.publish) if name == "tp1" else remote.publish
        try:
            thaw_vllm.restore(parent, thaw_format.load(path))
        finally:
            remote.publish = publish
        report["restored"][f"{name}_sent"] = lent.last_sent(parent)
        recapture(parent, f"{name}_in_tp2.thaw")
        report["restored"][name] = generate(parent, prompt)
    own = thaw_vllm.capture(parent, include_weights=False, chains=[prompt])
    parent.reset_prefix_cache()
    thaw_vllm.restore(parent, own)
    report["restored"]["own_sent"] = lent.last_sent(parent)
    recapture(parent, "own_in_tp2.thaw")
    report["restored"]["own"] = generate(parent, prompt)
    parent.reset_prefix_cache()
    done = thaw_vllm.finish(parent, thaw_vllm.restore(parent, midstream))
    report["restored"]["midstream"] = {r: {"token_ids": f.output_token_ids, "num_cached_tokens": f.cached_tokens}
                                       for r, f in done.items()}
    finished("restore", "restored")

    # A corrupt segment is refused before the engine changes: its first rank alone verifies it, for every rank.
    source = thaw_vllm.api.capture_shared(parent, chains=[prompt])
    corrupt_first_kv_chunk(source)
    try:
        thaw_vllm.api.restore_source(parent, source)
    except thaw_format.CorruptSnapshotError as error:
        report["corrupt_refused"] = str(error)
    try:  # and a corrupt file, which every rank reads and verifies
        thaw_vllm.api.restore_source(parent, corrupt_copy(os.path.join(out, "tp2.thaw")))
    except thaw_format.CorruptSnapshotError as error:
        report["corrupt_file_refused"] = str(error)
    try:  # a file replaced after this process read its structure: the ranks stage other bytes, each verified
        structure = thaw_vllm.transport.structure(os.path.join(out, "tp2.thaw"))
        thaw_vllm.api._restore_checked(parent, structure, config["tp1"], verify=True)
    except thaw_format.CorruptSnapshotError as error:
        report["replaced_file_refused"] = str(error)
    report["after_corrupt"] = generate(parent, prompt)
    finished("corrupt", "corrupt_refused", "corrupt_file_refused", "replaced_file_refused", "after_corrupt")

    with ForkPool(thaw_vllm.VLLMEngine(parent).launch_spec(), workers=1) as pool:  # closed on an error too
        round_ = pool.fork(thaw_vllm.VLLMEngine(parent), 1, context=prompt, suffixes=[suffix],
                           params=thaw_format.SamplingParams(**config["params"]))
    child = round_.generations[0]
    report["pool"] = {"token_ids": child.token_ids, "cached_tokens": child.cached_tokens}
    finished("pool", "pool")
    print("THAW_RESULT " + json.dumps(report), flush=True)


def refused(publish):
    """thaw_format.sdk.remote.publish, its sources naming a token this process does not hold: every rank finds
    another process under this one's pid and refuses to read it (RemoteReadError), as where the system forbids
    the read (Yama's ptrace scope, a seccomp filter)."""
    from thaw_format.sdk import remote

    def publish_refused(owner, snapshot):
        source = publish(owner, snapshot)
        if source is None:
            return None
        pid, token, rest = source[len(remote.REMOTE_PREFIX):].split("/", 2)
        address, _, value = token.partition("=")
        return f"{remote.REMOTE_PREFIX}{pid}/{address}={bytes(b ^ 0xFF for b in bytes.fromhex(value)).hex()}/{rest}"

    return publish_refused


def corrupt_copy(path: str) -> str:
    """A copy of a snapshot file, one bit flipped inside layer 0's K (flip_kv_bit)."""
    data = bytearray(open(path, "rb").read())
    flip_kv_bit(data)
    with open(path + ".corrupt", "wb") as f:
        f.write(data)
    return path + ".corrupt"


def capture_midstream(llm, config):
    """Two requests (greedy, seeded) captured a few tokens in, then run to the end in `llm`: the capture and, per
    request, its tokens captured and at the end."""
    import thaw_vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    core = llm.llm_engine
    for request_id, (prompt, temperature) in {"greedy": (config["midstream"][0], 0.0),
                                              "seeded": (config["midstream"][1], 1.0)}.items():
        params = SamplingParams(max_tokens=16, temperature=temperature, seed=1234 if temperature else None,
                                ignore_eos=True)
        core.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
    produced = {}
    while min((len(v) for v in produced.values()), default=0) < 5:
        for out in core.step():
            produced[out.request_id] = list(out.outputs[0].token_ids)
    snapshot = thaw_vllm.capture(llm, include_weights=False)
    final = {}
    while core.has_unfinished_requests():
        for out in core.step():
            if out.finished:
                final[out.request_id] = list(out.outputs[0].token_ids)
    captured = {r.id: {"output_token_ids": r.output_token_ids, "num_computed_tokens": r.num_computed_tokens,
                       "rng": r.rng_state is not None} for r in snapshot.scheduler.requests}
    return snapshot, {"captured": captured, "final": final}


if __name__ == "__main__":
    main()
