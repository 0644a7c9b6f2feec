"""New-process side of test_tensor_parallel: tensor-parallel (TP=2) engines, which need vLLM's thread binding set
before the process's first engine (vLLM caches its environment then): VLLM_CPU_OMP_THREADS_BIND, one CPU list per
rank, since the automatic binding wants a NUMA node per rank.

argv[1] is JSON: model, engine_kwargs, prompt (token ids), params (SamplingParams fields), suffix (token ids), tp1
(the path of a TP=1 engine's snapshot of the prompt's pages), midstream (two prompts), out (a directory). Two TP=2
engines: the parent, and a ForkPool worker's started from its launch spec, which starts in the background while
the parent works (its start is the slowest step). Steps, on the parent:
  capture: it generates the prompt and the prompt + suffix, describes itself and captures the prompt's pages with
          weights (saved as out/tp2.thaw); then it captures two requests mid-stream (greedy and seeded, a few
          tokens in), and runs them to the end;
  restore: it restores out/tp2.thaw, then the TP=1 snapshot with its ranks refused reads of this process's memory
          (they fall back on its restore segment); after each, its recapture of the prompt's pages is saved
          (out/tp2_in_tp2.thaw, out/tp1_in_tp2.thaw) and the prompt generated again; then it restores its own
          (lent) capture of those pages, and last the mid-stream capture, whose requests it runs to the end. A
          restore takes its blocks from the head of vLLM's free queue, blocks no request has held (a freed block
          goes to the tail), so what a recapture reads there is what the restore wrote, as in a fresh engine;
  corrupt: it is asked to restore a corrupt segment, then a corrupt file (refused; it serves on, its cache as it
          was);
  pool:   the pool's worker (a fresh TP=2 engine) forks the prompt + suffix from the parent.
Prints one line "THAW_RESULT <json>".
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from lent_helper import corrupt_first_kv_chunk


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
    parent = thaw_vllm.LLM(config["model"], **config["engine_kwargs"])
    starting = ThreadPoolExecutor(1).submit(ForkPool, thaw_vllm.VLLMEngine(parent).launch_spec(), workers=1)
    report["parent"] = {"prompt": generate(parent, prompt), "continued": generate(parent, prompt + suffix)}
    report["describe"] = thaw_vllm.describe(parent)
    thaw_format.save(thaw_vllm.capture(parent, include_weights=True, chains=[prompt]), os.path.join(out, "tp2.thaw"))
    midstream, report["midstream"] = capture_midstream(parent, config)

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

    # A corrupt segment is refused before the engine changes: its first rank alone verifies it, for every rank.
    source = thaw_vllm.api.capture_shared(parent, chains=[prompt])
    corrupt_first_kv_chunk(source)
    try:
        thaw_vllm.api.restore_source(parent, source)
    except thaw_format.CorruptSnapshotError as error:
        report["corrupt_refused"] = str(error)
    try:  # and a corrupt file, which every rank reads, the first rank alone verifying it
        thaw_vllm.api.restore_source(parent, corrupt_copy(os.path.join(out, "tp2.thaw")))
    except thaw_format.CorruptSnapshotError as error:
        report["corrupt_file_refused"] = str(error)
    report["after_corrupt"] = generate(parent, prompt)

    with starting.result() as pool:
        round_ = pool.fork(thaw_vllm.VLLMEngine(parent), 1, context=prompt, suffixes=[suffix],
                           params=thaw_format.SamplingParams(**config["params"]))
    child = round_.generations[0]
    report["pool"] = {"token_ids": child.token_ids, "cached_tokens": child.cached_tokens}
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
    """A copy of a snapshot file, one bit flipped inside layer 0's K."""
    import thaw_format

    data = bytearray(open(path, "rb").read())
    region = thaw_format.SnapshotFile(bytes(data)).info("kv/0/k")[2]
    data[region.offset + 1000] ^= 0x40
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
