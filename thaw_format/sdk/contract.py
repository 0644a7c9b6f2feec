"""The adapter contract: what a thaw adapter makes of one live engine. An engine author implements this.

Read top to bottom, this module is the whole contract. An adapter wraps one running engine (in this process,
or driving its own engine processes) in a class with these names, options and return types, and everything
thaw builds for users — fork, the fork pool, LangGraph, sleep/wake, the conformance suite — is written once
against it and works on every engine.

    engine = SomeAdapterEngine(...)                 # the adapter's constructor: it starts or wraps the engine
    out = engine.generate(prompt_ids, params)       # -> Generation(token_ids, cached_tokens, logprobs)
    snap = engine.capture(include_weights=False)    # -> thaw_format.Snapshot
    engine.check(snap)                              # raises IncompatibleSnapshotError; touches nothing
    resumed = engine.restore(snap)                  # -> list[Resumed]: the snapshot's unfinished requests
    done = engine.finish(resumed)                   # -> {request id: Finished}, each run to completion
    rid = engine.submit(prompt_ids, params); engine.step(); engine.progress()   # -> {request id: Progress}
    engine.abort(rid)                               # -> True if it was in flight: the engine lets it go
    children = engine.fork(2, context=prompt_ids)   # -> engines continuing `context` without its prefill
    source = engine.capture_shared(chains=[ids])    # -> "shm://<name>#<nbytes>": KV only, for other processes
    resumed = other.restore_source(source)          # -> list[Resumed]: restore from that source (or a file)
    engine.page_size()                              # -> int: tokens per KV page, as its captures hold them
    engine.weights_changed(digest)                  # a trainer changed the weights in place (RL): new identity
    engine.close()

An adapter class is constructed around a native engine it is given (`SomeAdapterEngine(native)`) and has a
classmethod `start(**kwargs)` that starts one; `launch_spec()` names that factory with JSON-able arguments, so
that `thaw_format.sdk.fork` can start an equal engine in another process without knowing the engine. Beside it,
the class attribute `launch_options` ({argument name: str, int, float, bool, sdk.LocalDirectory or
sdk.OneOf(values...)}) lists the arguments a snapshot file may carry, an allowlist (thaw_format.sdk.launch): `sleep`
writes only these, and `wake` starts an engine from a file's word with only these, each a plain value of its type
(a model: a local directory; a loader: one of those reading it).
List what an equal engine needs, never an option that names code, a plugin, a file of config, or a secret.

Sampling is the format's own `thaw_format.SamplingParams` (the set every snapshot records requests in), so a
request moves between engines and snapshots without a translation table per pair. Its default temperature is
1.0 as in the spec: use `greedy(n)` or `seeded(seed, n)` for the two modes every engine must get exactly.

Rules the callers rely on (conformance/README.md says which check proves each, and which no check proves yet):
- `generate` runs one request to completion and is deterministic for a given engine state: greedy, or seeded
  sampling. `Generation.cached_tokens` is the engine's own count of prompt tokens it did not recompute (its
  prefix-cache hit), never a number the adapter derives from what it expects.
- `capture` never changes what the engine will generate. `chains` (lists of token ids) limits the KV pages to
  those holding these prompts' prefixes; `include_weights=False` names the weights by digest only.
- `check` and `restore` refuse a snapshot that does not fit (model identity, KV layout, dtype, page size,
  requests) with thaw_format's IncompatibleSnapshotError naming the field, and a damaged one with
  CorruptSnapshotError, before any engine state changes: after such an error the engine serves as before.
- `restore` needs an idle engine (no request in flight); it may have served requests before.
- "streaming": `submit` takes a request while others are in flight, and each `step` advances every request in flight
  (or admits and prefills a new one) by at most one token each; `progress()` then names every request that advanced
  since the last call: its output so far, whether it has finished, and the engine's own cached-token count. `submit`
  may itself run the request's prefill, giving its first token (SGLang's does): a request of max_tokens=1 may then
  be finished when `submit` returns, its last Progress waiting for the next `progress()`, and the step after that
  lets it go. Each request gets exactly the tokens it gets alone (a batch changes no token), and a request's last
  Progress (finished=True) is reported once. A request `finish` returns is gone: `progress()` reports none of it
  after (what a step had made of it is dropped). Generation stops at `max_tokens`, at a token of `stop_token_ids`
  (which ends the output), or at the model's end of sequence unless `ignore_eos`. A request the engine refuses only once
  its turn comes (after `submit` returned) makes `step` raise `Refused` naming it, having changed nothing else: the
  other requests go on at the next step.
- "streaming" includes `abort(request_id)` (a caller that streams may leave): the request, queued or running, leaves
  the engine, which frees what it holds for it (its batch slot, its KV: a prefix cache may keep the computed pages
  as evictable, as it keeps a finished request's, or drop them). It returns True if the request was in flight (a
  restored one not yet resumed too), False (no error) if the id is unknown or the request's finished Progress was
  already made, by a step or by `submit`: a race with finishing is normal. An aborted request is reported once more,
  by the next `progress()`, as its last Progress: finished=True, aborted=True, its tokens as last reported (none
  new). It is then gone: no later step, `finish` or `capture` holds it, and the other requests in flight get exactly
  the tokens they get alone.
- `fork(n, context=...)` returns n engines (children) holding the KV of `context`; a child's `generate` takes
  prompts that extend `context`. In-process children share the parent's cached pages (no KV bytes move).
- `fork` is `thaw_format.sdk.fork.fork(self, ...)` unless the engine has a better way of its own.
- `capture_shared(chains=...)` is a KV-only capture (`include_weights=False`, and no request: those in flight
  are the engine's own to finish, never resumed by whoever restores it) of the pages holding `chains`,
  published once in shared memory; the source it returns stays valid until this engine's next
  `capture_shared`, and another process reads it with `thaw_format.sdk.shared.read_shared`.
  `restore_source(source)` restores such a source (or a snapshot file) with `restore`'s rules, every chunk
  checked; `verified=True` says the caller has checked every chunk of that shared-memory segment itself (a fork
  pool does, once for all its workers: thaw_format.sdk.shared.checked_by_caller), and the engine then leaves
  them unchecked; a file is always checked. Both come from
  `thaw_format.sdk.shared.SharedKV`, which an adapter's engine class inherits; an engine living in other
  processes overrides them to move the KV to and from those processes without a copy in between. The fork
  pool and process fork hand KV over through them only.
- `page_size()` is the number of tokens per page of the engine's KV, as its captures' `kv.page_size` says
  (vLLM: its block size, 128 by default on CPU). Full pages are what every engine caches and restores, so a
  caller handing KV over (the fork pool) cuts a prompt at a multiple of the engine's own page size.
- `weights_changed(digest=None)`: the caller changed the engine's weights in place (an RL step: vLLM's
  `model.load_weights` through `collective_rpc`, SGLang's `update_weights_from_tensor`, MLX's `load_weights`,
  torch's `load_state_dict`); the engine must be idle (a request in flight: RuntimeError, nothing changed). Call
  it straight after the load: a request served in between uses the old weights' KV with the new weights. For an
  engine whose identity is a checkpoint's, `digest` is `thaw_format.weights_digest` over the full new weights,
  names and dtypes as the checkpoint stores them (the trainer holds them), or None where unknown. For one whose
  identity names its own live weights (a model built in memory), the engine computes their digest again (a
  `digest` given must equal it; digest=None gives the live digest). After it `model_info().weights_digest` names
  the new weights; `check` and `restore` check snapshots against it (unknown: any snapshot naming a weights digest
  is refused, and so is a capture, UnknownWeightsError: thaw_format.sdk.inplace); the engine's prefix cache is
  dropped (its KV is the old weights'); a capture with weights holds the live weights, or is refused
  (UnknownWeightsError) by an adapter that can read back only its checkpoint's; `launch_spec()` is refused
  (Unsupported: an engine started from it would hold the checkpoint's weights), so `sleep` and
  `fork(processes=True)` refuse before anything changes. In-process fork children share the model, so they share
  the call too: each must be idle, and each is renamed and loses its old KV.
- What an adapter cannot do raises `Unsupported(reason)`; its `capabilities()` says so beforehand, so callers
  choose a path instead of catching the error after the fact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import ClassVar, Optional, Protocol, Sequence, runtime_checkable

from ..snapshot import ModelInfo, Request, SamplingParams, Snapshot

# What an engine may be able to do beyond the core (generate, capture, check, restore, close). An adapter
# lists its own in `capabilities()`; a caller needing one that is missing gets `Unsupported` from `require`.
CAPABILITIES = (
    "logprobs",  # Generation.logprobs is filled
    "seeded",  # seeded sampling is reproducible run to run and across processes
    "fork",  # fork(n, context=...) in this process (children share the parent's cache)
    "fork_processes",  # fork(..., processes=True): children are engines in other processes
    "mid_stream",  # submit / step / capture of requests in flight, restored and finished exactly
    "streaming",  # several requests in flight at once, each one's tokens after every step: progress()
    "mid_stream_seeded",  # the same for seeded sampling (the generator state travels)
    "weights",  # capture(include_weights=True) holds the engine's live weights, and restore loads them
)

# The methods an adapter class defines: the core ones always, and those each capability it declares needs (a
# method of a capability it lacks may be missing, or raise Unsupported). `adapter_problems` checks a class.
CORE_METHODS = ("model_info", "generate", "capture", "check", "restore", "weights_changed", "close")
CAPABILITY_METHODS = {
    "fork": ("fork",),
    "fork_processes": ("fork", "launch_spec", "page_size"),
    "mid_stream": ("submit", "step", "finish"),
    "mid_stream_seeded": ("submit", "step", "finish"),
    "streaming": ("submit", "step", "progress", "abort"),
}

# tokens per snapshot page where an adapter chooses it (MLX, SGLang's captures, transformers unless told); vLLM's
# pages are its blocks, whatever their size: ask an engine's page_size(), never assume this one
DEFAULT_PAGE_SIZE = 32


class Unsupported(Exception):
    """The adapter cannot do this; the message says what is missing and why."""


class Refused(Exception):
    """The engine refused a request it had accepted from `submit` (the message says why); nothing else changed."""

    def __init__(self, request_id: str, reason: str) -> None:
        super().__init__(f"request {request_id}: {reason}")
        self.request_id = request_id


def require(engine: "Engine", capability: str) -> None:
    """Raise Unsupported, naming the engine and the capability, unless the engine declares it."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
    if capability not in type(engine).capabilities():
        raise Unsupported(f"{type(engine).name}: the adapter does not support {capability!r}")


def adapter_problems(cls: type) -> list[str]:
    """What keeps the class `cls` from being a contract adapter, one sentence each (empty: none): its `name`, its
    `capabilities()` (a frozenset of CAPABILITIES' names, readable without an instance) and the methods those need."""
    problems = []
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        problems.append(f"{cls.__name__}.name must be the engine's name as a non-empty str, not {name!r}")
    try:
        declared = cls.capabilities()
    except Exception as exc:  # a method needing an instance, or one that crashes
        problems.append(f"{cls.__name__}.capabilities() must be a classmethod readable without an instance: "
                        f"{type(exc).__name__}: {exc}")
        declared = frozenset()
    if not isinstance(declared, frozenset):
        problems.append(f"{cls.__name__}.capabilities() returned {type(declared).__name__}, not a frozenset")
        declared = frozenset(declared) if isinstance(declared, (set, list, tuple)) else frozenset()
    unknown = sorted(str(c) for c in declared if c not in CAPABILITIES)
    if unknown:
        problems.append(f"{cls.__name__}.capabilities() names unknown {', '.join(map(repr, unknown))}; known: "
                        f"{', '.join(CAPABILITIES)}")
    needed = {m: "the core" for m in CORE_METHODS}
    for capability in sorted(declared & CAPABILITY_METHODS.keys()):
        needed.update({m: repr(capability) for m in CAPABILITY_METHODS[capability] if m not in needed})
    problems += [f"{cls.__name__} has no method {m}() (needed by {why})" for m, why in needed.items()
                 if not callable(getattr(cls, m, None))]
    return problems


def greedy(max_tokens: int, **fields) -> SamplingParams:
    """Greedy decoding of exactly `max_tokens` tokens (no stop on EOS)."""
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **fields)


def seeded(seed: int, max_tokens: int, *, temperature: float = 1.0, **fields) -> SamplingParams:
    """Seeded sampling over the full distribution, exactly `max_tokens` tokens (no stop on EOS)."""
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens, ignore_eos=True, **fields)


def check_params(params) -> None:
    """TypeError unless `params` is a SamplingParams: each engine's generate and submit call this first (None or a
    dict failed deep inside, differently on each engine)."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a thaw_format.SamplingParams (greedy(n), seeded(...)), not "
                        f"{type(params).__name__} {params!r}")


@dataclass
class Generation:
    token_ids: list[int]
    cached_tokens: int  # prompt tokens served from the engine's cache, as the engine itself reports
    logprobs: Optional[list[float]] = None  # log-probability of each sampled token ("logprobs" capability)


@dataclass
class Progress:
    """One request after an engine step ("streaming"): what token streaming and a reply's metadata read."""

    token_ids: list[int]  # every output token so far
    cached_tokens: int  # prompt tokens the engine served from its cache, by its own count (as in Generation)
    finished: bool
    aborted: bool = False  # finished by abort(), not by max_tokens, a stop token or EOS (then finished too)


@dataclass
class Resumed:
    """A request a restore continues: its id, its prompt, and what it had produced before the snapshot."""

    request_id: str
    prompt_token_ids: list[int]
    previous_output_token_ids: list[int] = field(default_factory=list)


@dataclass
class Finished:
    request_id: str
    output_token_ids: list[int]  # the whole output: before the snapshot and after it
    cached_tokens: int  # the engine's own count for the resumed request


@dataclass(frozen=True)
class LaunchSpec:
    """How to start an engine equal to this one in another process: `factory` ("module:attribute", dotted
    attributes allowed) called with `kwargs` (JSON-able) returns a contract engine serving the same model.
    `unrecorded` names the arguments the engine was started with that `kwargs` cannot hold (values that are not
    JSON-able): a start from `kwargs` alone lacks them, so `sleep` refuses unless told how wake gets them, and a
    process fork and the fork pools refuse it. In a launch record read from a sleep file (sleep.launch_record) it
    names the arguments given at wake, which the file does not hold either."""

    factory: str
    kwargs: dict
    unrecorded: frozenset = frozenset()


@runtime_checkable
class Engine(Protocol):
    name: ClassVar[str]  # the engine's name in receipts and errors: "vllm", "sglang", "mlx", ...

    @classmethod
    def capabilities(cls) -> frozenset:
        """The subset of CAPABILITIES this adapter supports, readable without an instance."""

    def model_info(self) -> ModelInfo:
        """The identity of the model served (spec 5.1): what a snapshot must name to be restored here."""

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        """Run one request to completion and return its tokens and the engine's own cached-token count."""

    def capture(self, *, include_weights: bool = True,
                chains: Optional[Sequence[Sequence[int]]] = None) -> Snapshot:
        """Snapshot the engine: cached KV pages with their token ids, requests in flight, and the weights."""

    def check(self, snapshot: Snapshot) -> None:
        """Raise IncompatibleSnapshotError, naming the field and both values, if the engine cannot hold it."""

    def restore(self, snapshot: Snapshot) -> list[Resumed]:
        """Check, then make the idle engine hold the snapshot's KV, prefix table (and weights, if it has them);
        its unfinished requests are resubmitted and returned."""

    def finish(self, requests: Optional[Sequence[Resumed]] = None) -> dict[str, Finished]:
        """Run the given resumed requests (default: every request in flight) to completion."""

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> str:
        """Start a request without finishing it; returns its id ("mid_stream")."""

    def step(self) -> dict[str, list[int]]:
        """Advance every request in flight by one engine step; returns those that finished: id -> output ids."""

    def progress(self) -> dict[str, Progress]:
        """Every request that advanced since the last call, with its tokens so far ("streaming")."""

    def abort(self, request_id: str) -> bool:
        """Take a submitted request out of the engine and free what it holds; False if it is unknown or finished
        ("streaming")."""

    def capture_shared(self, *, chains: Optional[Sequence[Sequence[int]]] = None) -> str:
        """A KV-only capture of the pages holding `chains`, published in shared memory: "shm://<name>#<nbytes>"."""

    def restore_source(self, source: str, *, verified: bool = False) -> list[Resumed]:
        """`restore` from a capture_shared source or a snapshot file, read in place and verified (unless
        `verified`: a shared-memory segment the caller has checked)."""

    def page_size(self) -> int:
        """Tokens per page of the engine's KV: its captures' kv.page_size ("fork_processes": the fork pool's cut)."""

    def fork(self, n: int, *, context: Sequence[int], processes: bool = False) -> list["Engine"]:
        """n children holding the KV of `context` ("fork", "fork_processes")."""

    def launch_spec(self) -> LaunchSpec:
        """How another process starts an engine equal to this one ("fork_processes")."""

    def weights_changed(self, digest: Optional[str] = None) -> None:
        """The weights were changed in place (the engine idle): name them by `digest` (thaw_format.weights_digest
        of the full new weights as the checkpoint stores them; None: unknown), or, where the identity names the live
        weights (no checkpoint's), by their digest computed again; drop the prefix cache's stale KV."""

    def close(self) -> None:
        """Free the engine (and its processes)."""


def pending_requests(snapshot: Snapshot) -> list[Request]:
    """The requests a restore continues: every one not finished, in the snapshot's order."""
    if snapshot.scheduler is None:
        return []
    return [r for r in snapshot.scheduler.requests if r.status != "finished"]


def lineage_now() -> str:
    """The one timestamp format of `lineage.created`: UTC, seconds precision, with a 'Z' suffix (RFC 3339)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
