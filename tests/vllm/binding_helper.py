"""New-process side of test_cpu_binding: a plain vLLM engine and one made with thaw_vllm.engine_args, both in
vLLM's default multiprocessing mode; reports, per engine, the cores each thread of its worker may run on, the
worker's OpenMP thread count, the greedy token ids of one prompt and the CPU time its worker process used
over 2 idle seconds after it; for thaw's engine also what describe() says of libthaw's mover, each worker
thread's cores before and after it started, the engine core's cores, and the worker's CPU time over 2 idle
seconds after describe() and after a capture (thaw's calls); as one "THAW_RESULT <json>" line.

argv[1] is JSON: model, engine_kwargs, prompt (token ids).
"""

import json
import os
import sys
import time

import psutil


def thread_cores(pid: int) -> dict:
    """Each thread of process `pid`: the sorted cores it may run on."""
    return {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


def worker_binding(known: set) -> tuple[int, dict]:
    """The one vLLM worker process started since `known` was listed: (pid, its binding)."""
    workers = [p for p in psutil.Process().children(recursive=True) if "Worker" in p.name() and p.pid not in known]
    assert len(workers) == 1, [p.name() for p in workers]
    pid = workers[0].pid
    cores = sorted({tuple(sorted(os.sched_getaffinity(int(tid)))) for tid in os.listdir(f"/proc/{pid}/task")})
    return pid, {"thread_cores": cores, "omp_threads": workers[0].environ().get("OMP_NUM_THREADS")}


def idle_cpu_seconds(pid: int, seconds: float = 2.0) -> float:
    """The CPU time (user + system, all threads) process `pid` used over `seconds` in which nothing was asked of
    it: CPU time, not wall time, so that a loaded machine does not make a sleeping process look busy."""
    process = psutil.Process(pid)
    before = process.cpu_times()
    time.sleep(seconds)
    after = process.cpu_times()
    return (after.user - before.user) + (after.system - before.system)


def main() -> None:
    config = json.loads(sys.argv[1])
    os.environ.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)  # as a fresh process has it: the test's own may be set
    import vllm
    from vllm.inputs import TokensPrompt

    import thaw_vllm

    params = vllm.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    result, known, engines = {}, set(), []
    for name in ("plain", "thaw"):
        kwargs = dict(config["engine_kwargs"])
        llm = vllm.LLM(config["model"], **(thaw_vllm.engine_args(**kwargs) if name == "thaw" else kwargs))
        engines.append(llm)
        pid, binding = worker_binding(known)
        known.add(pid)
        out = llm.generate([TokensPrompt(prompt_token_ids=config["prompt"])], params, use_tqdm=False)[0]
        result[name] = {**binding, "token_ids": list(out.outputs[0].token_ids), "idle_cpu": idle_cpu_seconds(pid)}
        if name == "thaw":
            before = thread_cores(pid)
            result[name]["mover"] = thaw_vllm.describe(llm)["mover"]
            result[name]["threads_before"], result[name]["threads_after"] = before, thread_cores(pid)
            result[name]["idle_cpu_after_describe"] = idle_cpu_seconds(pid)
            thaw_vllm.capture(llm, include_weights=False)
            result[name]["idle_cpu_after_capture"] = idle_cpu_seconds(pid)
            result[name]["engine_core_cores"] = sorted(os.sched_getaffinity(psutil.Process(pid).ppid()))
    print("THAW_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
