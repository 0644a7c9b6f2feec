"""Every private SGLang internal thaw_sglang touches, in one place, pinned to the tested SGLang version.

The rest of the adapter reaches SGLang's scheduler state only through these functions, so an SGLang upgrade
means re-checking this file alone. Importing it with another SGLang version fails at once.
"""

from __future__ import annotations

import contextlib
import json
import os
from array import array
from dataclasses import dataclass
from pathlib import Path

import psutil  # an SGLang dependency
import sglang
import torch

from thaw_format.sdk.pins import require_tested  # noqa: E402

TESTED_SGLANG_VERSION = "0.5.23"
require_tested("thaw_sglang", "SGLang", sglang.__version__, [TESTED_SGLANG_VERSION])

from sglang.srt import environ as _environ  # noqa: E402
from sglang.srt.managers import scheduler as _scheduler_module  # noqa: E402
from sglang.srt.managers.io_struct import ContinueGenerationReqInput, PauseGenerationReqInput  # noqa: E402
from sglang.srt.managers.load_snapshot import ShmLoadSnapshotWriter, shm_path_for  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402
from sglang.srt.mem_cache.unified_cache.component_type import ComponentType  # noqa: E402
from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeCore  # noqa: E402
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache  # noqa: E402
from sglang.srt.runtime_context import get_parallel  # noqa: E402
from sglang.srt.sampling import sampling_params as _sampling_params_module  # noqa: E402
from sglang.srt.utils.common import kill_process_tree  # noqa: E402

from .pages import RadixPath  # noqa: E402

SCHEDULER_CLASS_PATH = "sglang.srt.managers.scheduler.Scheduler"
Scheduler = _scheduler_module.Scheduler
run_scheduler_process = _scheduler_module.run_scheduler_process


class SleepsWhilePaused(Scheduler):
    """A Scheduler that waits for its next message while paused, as `sleep_on_idle` makes it wait while idle.

    SGLang's event loop skips its idle wait while paused (`_engine_paused`: the loop goes straight back to
    polling its sockets), so a paused engine spins a CPU even with sleep_on_idle. Paused, nothing can change
    until a message arrives (a continue, thaw's RPCs, requests that queue), so it waits on the same sockets
    with the same wait (`idle_sleeper`, None without sleep_on_idle: then SGLang's own spinning loop stays).
    """

    def _record_scheduler_state_for_paused_engine(self) -> None:  # called once per loop turn while paused
        super()._record_scheduler_state_for_paused_engine()
        # Only SGLang's zmq sleeper watches the RPC socket thaw's calls come by (the Rust server's does not:
        # a paused engine would answer each call up to a second late).
        if isinstance(self.idle_sleeper, _scheduler_module.IdleSleeper):
            self.maybe_sleep_on_idle()


def use_walkable_tree_core() -> None:
    """Select SGLang's Python radix-tree core in this process: the default Rust core cannot be walked."""
    _environ.envs.SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND.set("python")


def _tree(scheduler) -> UnifiedTreeCore:
    cache = scheduler.tree_cache
    if not isinstance(cache, UnifiedRadixCache):
        raise NotImplementedError(f"thaw_sglang supports SGLang's UnifiedRadixCache, not {type(cache).__name__}")
    core = cache.tree_core
    if not isinstance(core, UnifiedTreeCore):
        raise NotImplementedError(
            f"the radix tree core is {type(core).__name__}; thaw_sglang needs the walkable Python core "
            "(start the engine through thaw_sglang.ThawEngine)"
        )
    return core


def radix_paths(scheduler) -> list[RadixPath]:
    """Every root-to-leaf path of the device-resident radix tree, depth first in child-key order."""
    core = _tree(scheduler)
    full = ComponentType.FULL
    paths: list[RadixPath] = []
    stack = [(core.root_node, [], [])]
    while stack:
        node, tokens, slots = stack.pop()
        children = [child for _, child in sorted(node.children.items(), key=lambda item: repr(item[0]))]
        live = [c for c in children if c.component(full).value is not None]
        if not live and tokens:
            paths.append(RadixPath(tokens, torch.cat(slots).to(torch.int64)))
        for child in reversed(live):
            stack.append((child, tokens + list(child.key.token_ids), slots + [child.component(full).value]))
    return paths


def kv_pool(scheduler) -> MHATokenToKVPool:
    pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
    if type(pool) is not MHATokenToKVPool:
        raise NotImplementedError(f"thaw_sglang supports SGLang's MHATokenToKVPool, not {type(pool).__name__}")
    return pool


def kv_buffers(scheduler) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V buffers, each [slots + padding, kv_heads, head_dim]; slot 0 is padding."""
    pool = kv_pool(scheduler)
    return pool.k_buffer, pool.v_buffer


def tensor_parallel(scheduler) -> tuple[int, int, object]:
    """(this scheduler's tensor-parallel rank, the TP size, the torch.distributed group of the TP ranks over CPU)."""
    parallel = get_parallel()
    return parallel.tp_rank, parallel.tp_size, scheduler.tp_group.cpu_group


def other_parallelism(scheduler) -> dict[str, int]:
    """The parallel sizes besides plain tensor parallelism that are not 1: pipeline, data-parallel attention
    (which splits the TP ranks' attention into groups of its own), context parallel."""
    parallel = get_parallel()
    sizes = {name: getattr(parallel, name) for name in ("pp_size", "attn_dp_size", "attn_cp_size", "attn_dcp_size")}
    if parallel.attn_tp_size != parallel.tp_size:
        sizes["attn_tp_size"] = parallel.attn_tp_size
    return {name: size for name, size in sizes.items() if size != 1}


def total_kv_heads(scheduler) -> int:
    """The model's own KV heads, all ranks' together. On CPU, SGLang pads the heads up to a multiple of the TP size
    (adjust_config_with_unaligned_cpu_tp), rewriting the config's count and keeping the true one as
    `original_total_num_kv_heads`; where this process's config was not rewritten, config.json says it."""
    original = getattr(scheduler.model_config.hf_config, "original_total_num_kv_heads", None)
    if original is not None:
        return original
    return hf_config(scheduler).get("num_key_value_heads") or scheduler.model_config.get_total_num_kv_heads()


def engine_page_size(scheduler) -> int:
    return scheduler.page_size


def free_slots(scheduler) -> int:
    """KV slots no request holds: free, or held by the prefix cache alone (evictable), as vLLM counts its free
    blocks. Idle, every slot of the pool; a slot a request left behind is missing."""
    return scheduler.token_to_kv_pool_allocator.available_size() + scheduler.tree_cache.evictable_size()


def is_idle(scheduler) -> bool:
    return scheduler.is_fully_idle()


def set_paused(scheduler, paused: bool) -> None:
    """SGLang's in-place pause: no batch runs until it is lifted; requests keep their place and their KV."""
    if paused:
        scheduler.pause_generation(PauseGenerationReqInput(mode="in_place"))
    else:
        scheduler.continue_generation(ContinueGenerationReqInput(torch_empty_cache=False))  # no CUDA here


def flush(scheduler) -> bool:
    """SGLang's own cache flush: empties the tree and frees every slot (refused while requests run).

    Without its device-cache release: the slots are refilled at once, and on CPU that release is a full
    gc.collect() of the scheduler's heap (measured: 2.3 s, most of a restore's time; a fork pool's KV-in).
    """
    return scheduler.flush_cache(empty_cache=False)


def _key(tokens: list[int]) -> RadixKey:
    return RadixKey(array("q", tokens))  # the tree compares keys of one type: SGLang's own are arrays


def match(scheduler, tokens: list[int]) -> torch.Tensor:
    """The slots of the longest cached prefix of `tokens`."""
    cache = scheduler.tree_cache
    result = cache.match_prefix(MatchPrefixParams(key=_key(tokens)))
    if result.device_prefix_len == 0:
        return torch.empty(0, dtype=torch.int64)
    path = cache.path_device_indices(result.last_device_node)
    return path[: result.device_prefix_len].to(torch.int64)


def allocate(scheduler, count: int) -> torch.Tensor:
    slots = scheduler.token_to_kv_pool_allocator.alloc(count)
    if slots is None:
        raise MemoryError(f"SGLang's KV pool has no {count} free slots")
    return slots.to(torch.int64)


def insert(scheduler, tokens: list[int], slots: torch.Tensor, owned_prefix: int) -> None:
    """Add a path to the tree; its first `owned_prefix` slots are the tree's own (from `match`), the rest new."""
    scheduler.tree_cache.insert(
        InsertParams(key=_key(tokens), value=slots, prev_prefix_len=owned_prefix)
    )


def model(scheduler) -> torch.nn.Module:
    return scheduler.tp_worker.model_runner.model


def load_weights(scheduler, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
    """SGLang's runner-side weight update, by engine-native parameter name ("direct")."""
    ok, message = scheduler.tp_worker.model_runner.weight_updater.update_weights_from_tensor(
        named_tensors=named_tensors, load_format="direct"
    )
    if not ok:
        raise RuntimeError(f"SGLang refused the weight update: {message}")


def model_path(scheduler) -> Path:
    return Path(scheduler.server_args.model_path)


def hf_config(scheduler) -> dict:
    """The model's config.json as written, the same in every engine that loads this checkpoint."""
    with open(model_path(scheduler) / "config.json", encoding="utf-8") as f:
        return json.load(f)


def model_dtype(scheduler) -> str:
    return str(scheduler.model_config.dtype).removeprefix("torch.")


def attention_backend(scheduler) -> str:
    return str(scheduler.server_args.attention_backend)


@dataclass(frozen=True)
class LiveRequest:
    """A waiting or running request as the scheduler holds it; `slots` are its committed KV, if any."""

    rid: str
    status: str
    prompt: list[int]
    output: list[int]
    sampling: object  # sglang SamplingParams
    slots: torch.Tensor  # int64 [committed tokens]


def _running(scheduler) -> list:
    """The unfinished requests of the running batch, and those of a prefill batch not yet merged into it.

    SGLang merges a prefill batch into the running batch at the start of the next one; an in-place pause right
    after a prefill leaves its requests in `last_batch` alone. A finished request waits there to be filtered out.
    """
    running = [req for req in scheduler.running_batch.reqs if not req.finished()]
    last = scheduler.last_batch
    if last is not None and last is not scheduler.running_batch and last.forward_mode.is_extend():
        running += [req for req in last.reqs if not req.finished() and req is not scheduler.chunked_req
                    and all(req is not r for r in running)]
    return running


def gives_tokens(batch) -> bool:
    """Whether a batch holds a request not finished yet: one whose requests all finished gives no token."""
    return any(not req.finished() for req in batch.reqs)


def live_requests(scheduler) -> list[LiveRequest]:
    pool = scheduler.req_to_token_pool.req_to_token
    found = []
    for status, reqs in (("running", _running(scheduler)), ("waiting", scheduler.waiting_queue)):
        for req in reqs:
            prompt, output = list(req.origin_input_ids), list(req.output_ids)
            # SGLang counts a slot as committed when it allocates it, before the forward that writes it
            # (with overlap scheduling the next step may be under way): only tokens before the last sampled
            # one are sure to hold KV.
            written = max(len(prompt) + len(output) - 1, 0)
            committed = min(req.kv.kv_committed_len, written) if req.kv.req_pool_idx is not None else 0
            slots = pool[req.kv.req_pool_idx, :committed] if committed else torch.empty(0)
            found.append(
                LiveRequest(
                    rid=req.rid,
                    status=status,
                    prompt=prompt,
                    output=output,
                    sampling=req.sampling_params,
                    slots=slots.to(torch.int64),
                )
            )
    return found


def pool_capacity(scheduler) -> int:
    """Slots the KV pool has in all, free or not."""
    return scheduler.token_to_kv_pool_allocator.size


def leak_warnings(scheduler) -> int:
    """How many times SGLang's own pool-leak check has fired; it runs by itself whenever the scheduler idles."""
    checker = scheduler.invariant_checker
    return checker.count_memory_leak_warnings + checker.count_req_pool_leak_warnings



TOP_K_ALL = _sampling_params_module.TOP_K_ALL  # SGLang's "no top-k" (the format says 0)


def engine_processes_alive(engine) -> bool:
    """Whether every subprocess SGLang launched for this engine still runs (a killed one stays a zombie)."""
    launched = getattr(engine, "_scheduler_init_result", None)
    try:
        return launched is not None and all(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                                            for pid in launched.all_child_pids)
    except psutil.NoSuchProcess:
        return False


def unlink_load_report(scheduler) -> str | None:
    """Unlink the scheduler's load-report file (/dev/shm/sglang_loads_<instance id>_<digest>.shm) as soon as SGLang
    has made it: the scheduler writes it through the descriptor it holds, and the kernel frees it when the last
    process holding it ends, however it ends. SGLang never unlinks it, so a client SIGKILLed, or an engine that
    failed to start after this point, left it behind for good. Its readers are SGLang's HTTP server (/v1/loads)
    and its dispatcher over several DP ranks: an Engine serves neither with one rank, and then no one needs its
    name. With several, the dispatcher opens it by name: it stays until the engine shuts down. The path unlinked,
    or None (none made, gone already, or kept for the dispatcher)."""
    writer = scheduler.load_snapshot_writer
    if not isinstance(writer, ShmLoadSnapshotWriter) or get_parallel().num_dp_ranks != 1:
        return None
    try:
        os.unlink(writer.path)
    except FileNotFoundError:
        return None
    return writer.path


def stop_engine_processes(engine) -> None:
    """End the subprocesses of one Engine, and only those.

    SGLang's own Engine.shutdown kills every subprocess of the calling process, so with several engines in
    one process (a fork's parent and children) it would take the others along, and their subprocess
    watchdogs would then SIGQUIT the whole process.
    """
    manager = engine.tokenizer_manager
    if manager is not None and manager._subprocess_watchdog is not None:
        manager._subprocess_watchdog.stop()  # this engine's subprocesses are about to exit on purpose
    if getattr(engine, "send_to_rpc", None) is not None:
        engine.send_to_rpc.close(linger=0)
        engine.send_to_rpc = None
    launched = getattr(engine, "_scheduler_init_result", None)
    # Last launched first: a tensor-parallel engine's other ranks wait on its first rank, which waits on this
    # process's messages; killed first, the first rank would leave the others to fail, each with a traceback.
    for pid in reversed(launched.all_child_pids if launched is not None else []):
        kill_process_tree(pid, include_parent=True, wait_timeout=60)
    # The scheduler's load-report file, if it still has a name (several DP ranks: unlink_load_report): SGLang
    # never unlinks it, and ends the scheduler with SIGKILL. Its scheduler is gone now.
    port_args = getattr(engine, "port_args", None)
    if port_args is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shm_path_for(port_args.instance_id))
