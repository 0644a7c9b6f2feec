"""Every private vLLM internal thaw_vllm touches, in one module, pinned to the vLLM version it was tested with.

The rest of thaw_vllm reaches vLLM only through official points (the KV connector API, worker extensions
called by name through collective_rpc, the general-plugin entry point and the model-loader registry) and
through the functions here. A vLLM other than the tested one is refused at import: its internals may differ
in ways that would corrupt state silently.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import vllm

from thaw_format.sdk.pins import require_tested  # noqa: E402

TESTED_VLLM = "0.32.0"
require_tested("thaw_vllm", "vLLM", vllm.__version__, [TESTED_VLLM])

from vllm.distributed.device_communicators.shm_broadcast import SpinCondition  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.executor.multiproc_executor import WorkerProc  # noqa: E402
from vllm.v1.core import kv_cache_utils  # noqa: E402
from vllm.v1.request import RequestStatus  # noqa: E402

BlockHash = bytes


# --- engine start: the CPU cores vLLM gives its worker -------------------------------------------------------

RESERVED_CPUS_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def keep_cpu_reservation(engine_kwargs: dict) -> None:
    """Make vLLM's CPU backend bind an engine with thaw's KV connector to the cores it gives a plain engine.

    The multiprocessing executor binds the worker's OpenMP threads to a list of cores and keeps cores back for
    the engine core's busy loop: one per local rank (x86, Arm, RISC-V; one in all elsewhere), and one more per
    rank whenever any KV connector is configured ("for nixl_connector under p/d case",
    vllm/utils/ompmultiprocessing.py, OMPProcessManager.__init__). When that is as many cores as there are, it
    keeps none back (`_get_autobind_cpu_ids`): on 2 cores the worker goes from 1 bound thread to 2, on the cores
    where the engine core and the client spin, and its OpenMP kernels wait on starved threads. thaw's connector
    moves no KV between hosts, so the plain engine's reservation is set through vLLM's own knob, the variable
    VLLM_CPU_NUM_OF_RESERVED_CPU (read by the engine core when it starts the worker, by the CPU backend only).
    A value already set (the user's) is kept. It stays set in this process: a later engine with a connector
    that wants its extra core (NIXL) must set it itself.
    """
    if RESERVED_CPUS_ENV in os.environ:
        return
    from vllm.platforms import CpuArchEnum, current_platform

    if not current_platform.is_cpu():
        return
    ranks = int(engine_kwargs.get("tensor_parallel_size", 1)) * int(engine_kwargs.get("pipeline_parallel_size", 1))
    per_rank = current_platform.get_cpu_architecture() in (CpuArchEnum.X86, CpuArchEnum.ARM, CpuArchEnum.RISCV)
    os.environ[RESERVED_CPUS_ENV] = str(ranks if per_rank else 1)


def cpus_kept_beside(vllm_config, own: set[int]) -> set[int]:
    """The CPUs vLLM's CPU backend kept back from this worker (whose threads run on `own`: thread_cpus()), on
    its NUMA node, for the engine core and the client.

    The multiprocessing executor binds a CPU worker's threads to its rank's cores and leaves the rest of the
    node to the engine core (its busy loop) and the client, which it never binds: they are the CPUs of the
    engine-core process (the worker's parent) on the node of the worker's cores, less the worker's own and
    their SMT siblings (vLLM binds one hyperthread per core). Empty when vLLM did not choose the binding itself
    (VLLM_CPU_OMP_THREADS_BIND other than "auto": the user placed the threads, the rest may be another
    service's), when it did not bind this worker (the in-process executor: the caller's own threads), or when
    several local ranks share the kept cores (which is whose is the engine core's bookkeeping, not visible here).
    """
    parallel = vllm_config.parallel_config
    if (os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto"
            or parallel.distributed_executor_backend != "mp" or parallel.local_world_size != 1):
        return set()
    try:
        parent = os.sched_getaffinity(os.getppid())
    except OSError:  # the parent exited between the two calls: no kept cores to borrow
        return set()
    return (parent & _node_cpus(own)) - _with_siblings(own)


def _with_siblings(cpus: set[int]) -> set[int]:
    """`cpus` and their SMT siblings (the other hyperthreads of the same cores)."""
    out = set(cpus)
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                out |= _cpu_list(f.read())
        except OSError:  # no topology shown (some containers): no siblings known
            pass
    return out


def thread_cpus() -> set[int]:
    """Every CPU some thread of this process may run on (vLLM binds its worker's threads one core each)."""
    cpus = set(os.sched_getaffinity(0))
    for task in os.listdir("/proc/self/task"):
        try:
            cpus |= os.sched_getaffinity(int(task))
        except OSError:  # a thread that has just exited
            pass
    return cpus


def _node_cpus(cpus: set[int]) -> set[int]:
    """The CPUs of the NUMA nodes holding `cpus` (all CPUs where the kernel shows no nodes)."""
    root = "/sys/devices/system/node"
    nodes = [n for n in os.listdir(root) if n.startswith("node") and n[4:].isdigit()] if os.path.isdir(root) else []
    if not nodes:
        return set(range(os.cpu_count() or 1))
    out = set()
    for node in nodes:
        with open(f"{root}/{node}/cpulist") as f:
            members = _cpu_list(f.read())
        if members & cpus:
            out |= members
    return out


def _cpu_list(text: str) -> set[int]:
    """A kernel CPU list ("0-3,8,10-11") as a set."""
    out = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            out.update(range(int(first), int(last or first) + 1))
    return out


# --- worker side: KV tensors, model, per-request sampling generators ---------------------------------------

def kv_cache_tensors(worker) -> list[torch.Tensor]:
    """The per-layer KV tensors of vLLM's CPU attention, in layer order, each allocated as
    [num_blocks, num_kv_heads, block_size, 2 * head_dim]. That shape is an allocation, not the layout: the
    attention backend reinterprets each block (see `cpu_attn_write` and pages.py). Others are refused."""
    caches = list(worker.model_runner.kv_caches)
    for i, cache in enumerate(caches):
        if cache.dim() != 4 or not cache.is_contiguous():
            raise NotImplementedError(
                f"KV layer {i} has shape {tuple(cache.shape)} (contiguous={cache.is_contiguous()}); thaw_vllm knows "
                "only the CPU attention allocation [blocks, kv_heads, block_size, 2*head_dim]"
            )
    return caches


def tensor_parallel_rank() -> int:
    """This worker's rank in its tensor-parallel group (0 without tensor parallelism): the KV heads it holds."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


def tp_cpu_group():
    """This worker's tensor-parallel group's CPU process group (gloo): the group its ranks agree over."""
    from vllm.distributed.parallel_state import get_tp_group

    return get_tp_group().cpu_group


def attention_backends(worker) -> list[tuple[str, str | None, str]]:
    """(attention backend name, ISA, KV-cache dtype) of the layer bound to each tensor of kv_cache_tensors.

    The ISA is the one vLLM's CPU attention picked for the layer's KV-cache group (`vec`, `vec16`, `amx`, ...):
    its metadata builder stores it on every layer as `layer.isa`, and the block layout depends on it.
    """
    layers = {}
    for layer in worker.vllm_config.compilation_config.static_forward_context.values():
        cache = getattr(layer, "kv_cache", None)
        if isinstance(cache, torch.Tensor) and cache.numel():
            layers.setdefault((cache.data_ptr(), cache.shape), layer)
    out = []
    for cache in worker.model_runner.kv_caches:
        layer = layers.get((cache.data_ptr(), cache.shape))  # the same blocks, seen with the same shape
        if layer is None:
            out.append(("unknown", None, "unknown"))
        else:
            out.append((layer.get_attn_backend().get_name(), getattr(layer, "isa", None), str(layer.kv_cache_dtype)))
    return out


def allow_amx_tiles() -> None:
    """Ask the kernel for this process's AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, through torch), as oneDNN
    does before its first AMX matmul. vLLM's CPU attention on the `amx` ISA runs AMX tile instructions without
    asking and relies on oneDNN having asked first: on an Intel CPU with AMX, a fresh process whose first forward
    was a restored request's died there with SIGILL (tests/vllm/test_midstream.py, bfloat16). Idempotent."""
    torch.cpu._init_amx()


def cpu_attn_write(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, isa: str) -> None:
    """Write K and V [tokens, kv_heads, head_dim] into `slots` (block * block_size + offset) of a CPU attention
    cache with vLLM's own writer, exactly as CPUAttentionBackendImpl.do_kv_cache_update calls it: the block is
    viewed as [kv_heads, 2 * block_size, head_dim] and split into a K half and a V half, and the C++ op stores
    each half in the order the ISA's attention kernel reads."""
    from vllm import _custom_ops as ops

    num_blocks, heads, block_size, _ = cache.shape
    key_cache, value_cache = cache.view(num_blocks, heads, 2 * block_size, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


def sampling_generator(worker, request_id: str) -> torch.Generator | None:
    """The torch.Generator vLLM made for a seeded request, or None (unseeded, or not yet on the worker)."""
    state = worker.model_runner.requests.get(request_id)
    return None if state is None else state.generator


def external_request_id(request_id: str) -> str:
    """vLLM appends "-<8 random chars>" to the caller's request id (InputProcessor.assign_request_id)."""
    return request_id.rsplit("-", 1)[0]


# --- scheduler side: block pool, prefix-cache table, requests ----------------------------------------------

def kv_cache_manager(core):
    return core.scheduler.kv_cache_manager


def cached_blocks(kv_cache_manager) -> Iterator[tuple[BlockHash, int, Any]]:
    """(block hash, KV-cache group id, block) for every entry of the prefix-cache table."""
    table = kv_cache_manager.block_pool.cached_block_hash_to_block._cache
    for key, blocks in table.items():
        block_hash, group = kv_cache_utils.get_block_hash(key), kv_cache_utils.get_group_id(key)
        for block in (blocks.values() if isinstance(blocks, dict) else (blocks,)):
            yield bytes(block_hash), group, block


def cached_block(kv_cache_manager, block_hash: BlockHash, group: int = 0):
    """The block the prefix-cache table holds under (block hash, KV-cache group id), the first of duplicates, or
    None: one lookup (the block pool's own, as a prefix-cache hit makes it), where cached_blocks walks the table."""
    blocks = kv_cache_manager.block_pool.get_cached_block(block_hash, [group])
    return None if blocks is None else blocks[0]


def num_blocks(kv_cache_manager) -> int:
    """The pool's size, null block included: about the most full-block entries one group holds."""
    return kv_cache_manager.block_pool.num_gpu_blocks


def num_free_blocks(kv_cache_manager) -> int:
    return kv_cache_manager.block_pool.get_num_free_blocks()


def reset_prefix_cache(kv_cache_manager) -> bool:
    return kv_cache_manager.reset_prefix_cache()


def take_blocks(kv_cache_manager, n: int) -> list:
    """n fresh blocks, each held once (ref count 1), evicting cached blocks the engine no longer needs."""
    return kv_cache_manager.block_pool.get_new_blocks(n) if n else []


def publish_block(kv_cache_manager, block, block_hash: BlockHash, group: int, num_tokens: int) -> None:
    """Make a filled block findable by prefix lookups under its chain hash."""
    key = kv_cache_utils.make_block_hash_with_group_id(block_hash, group)
    block.set_block_hash(key, num_tokens=num_tokens)
    kv_cache_manager.block_pool.cached_block_hash_to_block.insert(key, block)


def release_blocks(kv_cache_manager, blocks: Sequence) -> None:
    """Drop our hold: cached blocks stay in the table as evictable entries, first ones evicted first."""
    kv_cache_manager.block_pool.free_blocks(blocks)


def request_block_ids(kv_cache_manager, request_id: str) -> list[int]:
    return list(kv_cache_manager.get_block_ids(request_id)[0])


def request_fields(request) -> dict:
    """Plain data of a scheduler request (vllm.v1.request.Request)."""
    return {
        "request_id": request.request_id,
        "status": request.status,
        "prompt_token_ids": list(request.prompt_token_ids or []),
        "output_token_ids": list(request.output_token_ids),
        "num_computed_tokens": int(request.num_computed_tokens),
        "block_hashes": [bytes(h) for h in request.block_hashes],
        "sampling_params": request.sampling_params,
    }


def status_name(status) -> str:
    if status == RequestStatus.RUNNING:
        return "running"
    if status == RequestStatus.PREEMPTED:
        return "preempted"
    return "finished" if RequestStatus.is_finished(status) else "waiting"


# --- the engine's own prefix hashing ------------------------------------------------------------------------

def hash_function(vllm_config) -> tuple[str, Callable[[Any], bytes]]:
    name = vllm_config.cache_config.prefix_caching_hash_algo
    return name, get_hash_fn_by_name(name)


def hash_seed() -> str:
    """The seed of the first block's parent hash in this process (fixed for sha256 unless PYTHONHASHSEED)."""
    return kv_cache_utils.get_none_hash_seed()


def chain_hashes(hash_fn: Callable[[Any], bytes], pages: Iterable[Sequence[int]], parent: BlockHash | None = None) -> Iterator[BlockHash]:
    """vLLM's block hashes of consecutive full pages continuing `parent` (None: a root), each hashed when asked for."""
    for tokens in pages:
        parent = bytes(kv_cache_utils.hash_block_tokens(hash_fn, parent, tokens, None))
        yield parent


# --- the engine core: thaw's one method on it, and how a client reaches it ----------------------------------

def install_engine_core_method(name: str, fn: Callable) -> None:
    """Give vLLM's EngineCore a method the client can call by name as a utility call (plain-data arguments).

    Loaded in every vLLM process through thaw's general plugin. The scheduler (block pool, prefix table,
    requests) lives in the engine-core process, which no official hook lets a client call into.
    """
    from vllm.v1.engine.core import EngineCore

    setattr(EngineCore, name, fn)


def call_engine_core(llm, name: str, *args):
    client = llm.llm_engine.engine_core
    core = getattr(client, "engine_core", None)  # InprocClient (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    if core is not None:
        if not hasattr(core, name):
            raise RuntimeError(f"vLLM's engine core has no {name}: thaw's vllm.general_plugins entry point is not installed")
        return getattr(core, name)(*args)
    return client.call_utility(name, *args)


@contextlib.contextmanager
def worker_awaited_asleep(core) -> Iterator[None]:
    """While inside, the engine core waits for its workers' replies asleep instead of spinning.

    A multiprocessing executor reads each worker's reply from a shared-memory MessageQueue; its reader spins on
    sched_yield for `busy_loop_s` (1 s, fixed in vLLM 0.32: no setting reaches it) after each message it read,
    then sleeps on the zmq notification every write sends (`SpinCondition.wait`). Between engine steps the spin
    saves a wake-up; during one of thaw's calls it takes a share of the core the worker's KV mover runs on
    beside the worker's own (measured over back-to-back 256 MiB captures on 2 CPUs: 0.22 of a core). So for a
    thaw call the engine core goes straight to the sleeping wait, woken by the worker's notification; vLLM's
    own spin is back after it. No effect in-process (no queue) or on a follower node.
    """
    # Queues of workers on other nodes have no condition: their reader waits on zmq and never spins.
    conditions = [mq._spin_condition for mq in getattr(core.model_executor, "response_mqs", ())
                  if mq._spin_condition is not None]
    for condition in conditions:
        if not isinstance(condition, SpinCondition) or not condition.is_reader:
            raise RuntimeError(f"vLLM's worker reply queue waits with {type(condition).__name__}, not the reader "
                               "side of the SpinCondition thaw_vllm was tested with")
    spins = [condition.busy_loop_s for condition in conditions]
    for condition in conditions:
        condition.busy_loop_s = 0
    try:
        yield
    finally:
        for condition, spin in zip(conditions, spins):
            condition.busy_loop_s = spin


def worker_waits_asleep_after_this_call() -> None:
    """Called in a worker during one of thaw's calls: when the call is done, the worker waits for its next
    message asleep instead of spinning.

    A multiprocessing worker reads its calls from a shared-memory MessageQueue whose reader spins on
    sched_yield for `busy_loop_s` (1 s, fixed in vLLM 0.32) from the moment it read a message
    (`SpinCondition.record_read`), then sleeps on the zmq notification every write sends. Between engine steps
    the spin saves a wake-up; after one of thaw's calls, which come one at a time with the engine idle between
    them, it burns a core for the rest of that second (on 2 CPUs, half the machine) while the client and the
    engine core are the ones with work. A last read in the past sends the next wait straight to sleep, woken by
    the next message's notification; that message's read starts vLLM's spin again.

    The queue is held only by the WorkerProc running this call (vLLM keeps no other reference to it), so it is
    found on the stack. In-process (UniProcExecutor) there is none, and a follower node's queue has no
    condition (its reader waits on zmq): nothing spins, nothing to do."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not WorkerProc._execute_worker_rpc.__code__:
        frame = frame.f_back
    if frame is None:
        return
    condition = frame.f_locals["self"].rpc_broadcast_mq._spin_condition
    if condition is None:
        return
    if not isinstance(condition, SpinCondition) or not condition.is_reader:
        raise RuntimeError(f"vLLM's worker call queue waits with {type(condition).__name__}, not the reader side of "
                           "the SpinCondition thaw_vllm was tested with")
    condition.last_read = -math.inf


def unfinished_requests(core) -> list:
    return [r for r in core.scheduler.requests.values() if not RequestStatus.is_finished(r.status)]


def worker_connector():
    """The worker-side KV connector vLLM built in this process."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()


def engine_in_this_process(llm) -> bool:
    """True when the engine core and its worker both run in the caller's process."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    return core is not None and type(core.model_executor).__name__ == "UniProcExecutor"
