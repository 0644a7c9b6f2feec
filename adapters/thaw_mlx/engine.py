"""MLXEngine: the adapter contract (thaw_format.sdk.contract) over an mlx-lm model and the sessions it served.

mlx-lm has no server and no prefix cache: the engine is a model plus its sessions (token ids + prompt cache).
A request starts from a copy of the KV of the longest prefix of its prompt that a session holds, as a prefix
cache would, and its cached-token count is that prefix's length. Several requests may be in flight: each step
advances each by one token over its own cache, so each gets exactly the tokens it gets alone. A capture of the
whole engine holds every session and the request in flight (at most one), as one prefix tree whose shared pages
are written once (thaw_mlx.prefix_tree), and a restore makes a session of each branch: a woken engine serves
every prefix the parent held from its pages. A model with ring (sliding window) or recurrent layers holds one
sequence's state per layer: its capture keeps one, and warns (SessionsNotHeld) for the sessions it leaves out.
`chains=[tokens]` holds that chain's longest held prefix only. Sampling goes through
thaw_mlx.Sampler, whose PRNG key a snapshot keeps. A model loaded from a checkpoint
(`MLXEngine.start(checkpoint=...)`) is identified by that checkpoint, as vLLM and SGLang identify theirs, so that
snapshots cross engines; its config's EOS ids end a request that does not ignore EOS.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from thaw_format import (CorruptSnapshotError, IncompatibleSnapshotError, ModelInfo, Request, SamplingParams, Snapshot,
                         weights_digest)
from thaw_format.compat import expect_snapshot
from thaw_format.document import validate
from thaw_format.sdk import (DEFAULT_PAGE_SIZE, Finished, Generation, LaunchSpec, LocalDirectory, Progress, Resumed,
                             Unsupported, fork, pending_requests)
from thaw_format.sdk.contract import check_params
from thaw_format.sdk.inplace import InPlaceWeights, check_idle
from thaw_format.sdk.lent import open_snapshot, verify_unchecked
from thaw_format.sdk.request_ids import RequestIds
from thaw_format.sdk.shared import SHM_PREFIX, SharedKV, checked_by_caller, owned_segment
from thaw_format.sdk.tokens import common_prefix_length

from .files import deferring, fill_of, mapped_snapshot
from .generate import generate, token_ids
from .identity import check_snapshot_model, checked_info, model_info, model_weights
from .pages import moved_buffers, num_cached_tokens, paged_kind
from .sampling import Sampler, request_sampler
from .session import caches_of_checked, capture, check_cache_layout, check_sequences_kv, engine_requests, restore


def _mlx_lm_config(hf_config: dict) -> dict:
    """Fields mlx-lm reads under their transformers-4 names, from a transformers-5 config.json."""
    rope = hf_config.get("rope_parameters") or {}
    config = {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type") == "yarn":
        config["rope_scaling"] = dict(rope, type="yarn")
    if "num_local_experts" in hf_config:
        config["num_experts"] = hf_config["num_local_experts"]
    return config


class _Session:
    def __init__(self, tokens: list[int], cache: list) -> None:
        self.tokens, self.cache = tokens, cache


class _Request:
    """A request in flight, advanced one token at a time over its own session (its tokens grow as it yields)."""

    def __init__(self, rid: str, model, session: _Session, num_prompt: int, sampler: Sampler, cached: int,
                 eos: frozenset) -> None:
        self.id, self.session, self.num_prompt, self.sampler, self.cached = rid, session, num_prompt, sampler, cached
        params = sampler.params
        self.stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos)
        self.logprobs: list[float] = []
        remaining = params.max_tokens - len(self.output)
        self.done = remaining <= 0 or bool(self.output and self.output[-1] in self.stop)
        self._steps = generate(model, session.cache, list(session.tokens), remaining, sampler=self._sample)

    @property
    def output(self) -> list[int]:
        return self.session.tokens[self.num_prompt :]

    def _sample(self, logprobs):
        token = self.sampler(logprobs)
        self.logprobs.append(logprobs[0, token.item()].item())
        return token

    def advance(self) -> None:
        """Generate one more token; done at max_tokens or at a stop token (which ends the output)."""
        token = next(self._steps)
        self.session.tokens.append(token)
        self.done = len(self.output) >= self.sampler.params.max_tokens or token in self.stop

    def progress(self) -> Progress:
        return Progress(list(self.output), self.cached, self.done)

    def release(self) -> list:
        """This request's cache, for a restore that replaces it: the request drops its generator, whose frame holds
        the cache (and, through the sampler, the request: a cycle only the garbage collector would free)."""
        self._steps = None
        return self.session.cache


class SessionsNotHeld(UserWarning):
    """A capture of the whole engine (no chains) left out the KV of some sessions: those of a model with ring
    (sliding window) or recurrent layers, whose snapshot holds one sequence's state per layer, or a session whose
    cache is laid out otherwise than the one captured (another quantization). An engine restored from the
    snapshot (a woken one) serves their prefixes by computing them again, with the same tokens but no cached
    tokens; to keep a given prefix, capture it by name (chains=[tokens])."""


class MLXEngine(SharedKV):
    name = "mlx"

    def __init__(self, model, info: Optional[ModelInfo] = None, *, checkpoint: Optional[str] = None) -> None:
        self.model, self.checkpoint = model, checkpoint
        # The model's identity, digested once; a caller's is checked to name the model's dtype.
        self._in_place = InPlaceWeights.loaded(checkpoint, info)  # weights changed in place since (weights_changed)
        self.info = model_info(model, checkpoint=checkpoint) if info is None else checked_info(model, info)
        self.eos = _eos_ids(checkpoint)
        self.sessions: list[_Session] = []  # served requests: the engine's prefix cache
        self.running: dict[str, _Request] = {}  # in flight, in order of submission
        self._progress: dict[str, Progress] = {}  # requests that advanced since the last progress()
        self._ids = RequestIds("mlx")

    @classmethod
    def start(cls, checkpoint: str) -> "MLXEngine":
        """Load a Hugging Face checkpoint directory with mlx-lm."""
        from mlx_lm.utils import load_model

        hf_config = json.loads((Path(checkpoint) / "config.json").read_text())
        model, _ = load_model(Path(checkpoint), model_config=_mlx_lm_config(hf_config))
        return cls(model, checkpoint=str(checkpoint))

    @classmethod
    def capabilities(cls) -> frozenset:
        return frozenset({"logprobs", "seeded", "fork", "fork_processes", "mid_stream", "mid_stream_seeded",
                          "streaming"})

    def model_info(self) -> ModelInfo:
        return self.info

    def weights_changed(self, digest: Optional[str] = None) -> None:
        """The model's weights were changed in place (`model.load_weights(...)` or `model.update(...)`, an RL
        step), the engine idle: its served sessions, the KV of the old weights, are dropped, and its identity names
        the new weights (InPlaceWeights.renamed: a checkpoint's by `digest`, None: unknown; a model built in memory
        by the digest of MLX's own weights, computed again). Captures with weights hold the live weights."""
        check_idle(bool(self.running))
        self._in_place, self.info = self._in_place.renamed(self.info, digest,
                                                           lambda: weights_digest(model_weights(self.model)))
        self.sessions, self._progress = [], {}

    # --- serving ---

    def _continue_from(self, prompt: list[int]) -> tuple[list, int]:
        """A private copy of the KV of the longest prefix of the prompt a session holds (at most all but its
        last token, whose logits the request needs), and its length: the engine's prefix-cache hit."""
        held = self._held(prompt, len(prompt) - 1)
        if held is None:
            return make_prompt_cache(self.model), 0
        tokens, view = held
        snapshot = capture(self.model, view, tokens, include_weights=False, info=self.info)
        return restore(self.model, snapshot, info=self.info), len(tokens)

    def _held(self, tokens: list[int], limit: int) -> Optional[tuple[list[int], list]]:
        """The longest prefix of `tokens` (at most `limit`) whose KV a session holds, and a view of that KV: the
        session's cache cut back to it in a shallow copy (the arrays are shared, not copied). A cache that cannot
        be cut back (a rotating window that has wrapped, a recurrent layer) serves only prompts that extend it."""
        best, best_n = None, 0
        for session in self.sessions:
            offset = num_cached_tokens(session.cache)
            n = min(common_prefix_length(session.tokens, tokens), offset, limit)
            if n > best_n and (n == offset or can_trim_prompt_cache(session.cache)):
                best, best_n = session, n
        if best is None:
            return None
        view = [copy.copy(layer) for layer in best.cache]
        past = num_cached_tokens(view) - best_n
        if past and trim_prompt_cache(view, past) != past:
            raise RuntimeError(f"mlx-lm trimmed fewer than {past} tokens from a cache it said it can trim")
        return tokens[:best_n], view

    def _request(self, prompt: Sequence[int], params: SamplingParams) -> _Request:
        """A new request over a copy of the longest prefix of its prompt a session holds (the prefix-cache hit)."""
        prompt = token_ids(self.model, prompt)
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        if params.max_tokens is None:
            raise ValueError("thaw_mlx needs max_tokens (mlx-lm has no length limit of its own)")
        if params.max_tokens < 1:  # as vLLM and thaw_transformers refuse it (0 or less gave an empty reply here)
            raise ValueError(f"thaw_mlx needs max_tokens of at least 1, got {params.max_tokens}")
        sampler = Sampler(params)  # refuses what it cannot apply, before anything is computed
        cache, cached = self._continue_from(prompt)
        rid = self._ids.fresh(self.running)
        return _Request(rid, self.model, _Session(prompt, cache), len(prompt), sampler, cached, self.eos)

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        check_params(params)
        request = self._request(prompt, params)
        while not request.done:
            request.advance()
        self.sessions.append(request.session)
        return Generation(request.output, request.cached, request.logprobs)

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> str:
        check_params(params)
        request = self._request(prompt, params)
        self.running[request.id] = request
        return request.id

    def step(self) -> dict[str, list[int]]:
        """Every request in flight generates one token, each over its own cache: its tokens are those it
        gets alone. A request that finished becomes a session (prefix cache) for later ones."""
        finished = {}
        for request in list(self.running.values()):
            if not request.done:
                request.advance()
            self._progress[request.id] = request.progress()
            if request.done:
                self.sessions.append(self.running.pop(request.id).session)
                finished[request.id] = request.output
        return finished

    def abort(self, request_id: str) -> bool:
        """Drop a request in flight with its cache (a copy of a session's KV plus what it computed): only a finished
        request becomes a session, and sessions are never evicted, so each abandoned one would stay for good."""
        request = self.running.pop(request_id, None)
        if request is None:
            return False
        request.release()  # its generator's frame holds the cache
        self._progress[request_id] = Progress(list(request.output), request.cached, True, aborted=True)
        return True

    def progress(self) -> dict[str, Progress]:
        out, self._progress = self._progress, {}
        return out

    def finish(self, requests: Optional[Sequence[Resumed]] = None) -> dict[str, Finished]:
        ids = list(self.running) if requests is None else [r.request_id for r in requests
                                                            if r.request_id in self.running]
        done = {}
        for rid in ids:
            request = self.running.pop(rid)
            while not request.done:
                request.advance()
            self.sessions.append(request.session)
            done[rid] = Finished(rid, request.output, request.cached)
            self._progress.pop(rid, None)  # finished here: gone, not reported again
        return done

    # --- state ---

    def _current(self, chains) -> tuple[list[tuple[list[int], list]], Optional[_Request]]:
        """What a snapshot holds: (tokens, cache) of each sequence, the first written as its request, and that
        request if it is one in flight; no sequence for no KV (chains=[], or nothing served). With `chains`, the
        KV of the chain; else the one request in flight, or else the latest session, then every other session
        whose cache is paged as its is (pages.paged_kind: not one of a ring or recurrent layer)."""
        if chains is not None:
            held = self._held([int(t) for t in chains[0]], len(chains[0])) if chains else None
            return ([] if held is None else [held]), None
        if len(self.running) > 1:
            raise Unsupported(f"an MLX snapshot holds at most one request in flight; {len(self.running)} are in "
                              "flight: capture one chain, or finish them first")
        request = next(iter(self.running.values()), None)
        if request is not None:
            first, rest = request.session, self.sessions
        elif self.sessions:
            first, rest = self.sessions[-1], self.sessions[:-1]
        else:
            return [], None
        if not num_cached_tokens(first.cache):  # submitted, nothing computed: capture refuses it (ValueError),
            return [(first.tokens, first.cache)], request  # and no other session is left out for its layout
        kind = [paged_kind(c) for c in first.cache]
        alike = [s for s in rest if None not in kind and [paged_kind(c) for c in s.cache] == kind]
        held = [(first.tokens, first.cache)] + [(s.tokens, s.cache) for s in alike]
        self._warn_left_out([tokens for tokens, _ in held], [s for s in rest if s not in alike])
        return held, request

    def _warn_left_out(self, held: list[list[int]], left: list[_Session]) -> None:
        """SessionsNotHeld, naming them, for the sessions left out whose cached tokens are not a prefix of one
        held; the tokens it counts are those past the longest prefix they share with one (the left-out KV)."""
        past = [num_cached_tokens(s.cache) - max(common_prefix_length(s.tokens, tokens) for tokens in held)
                for s in left]
        past = [n for n in past if n > 0]
        if past:
            warnings.warn(SessionsNotHeld(
                f"mlx: this capture or sleep holds {len(held)} sequences; the KV of {len(past)} other sessions "
                f"({sum(past)} tokens past the prefix they share with those) is left out, so an engine restored or "
                "woken from it computes them again (same tokens, none cached): a ring (sliding window) or recurrent "
                "layer holds one sequence, and a cache laid out otherwise shares no pages. A sleep keeps the sessions "
                "paged alike and the one request in flight; capture(chains=[tokens]) keeps another"),
                stacklevel=5)  # the caller of capture

    def capture(self, *, include_weights: bool = True, chains=None) -> Snapshot:
        return self._capture(include_weights, chains)

    def capture_shared(self, *, chains=None) -> str:
        """A KV-only capture published in this engine's reused segment, its pages gathered straight into the
        segment with their chunk CRCs (one pass from MLX's memory), valid until the next capture_shared."""
        fills = {}
        snapshot = self._capture(False, chains, deferring(fills))
        snapshot.scheduler = None  # KV only: a request in flight stays this engine's (the contract's rule)
        return owned_segment(self).publish(snapshot, fill_of(snapshot, fills))

    def _capture(self, include_weights: bool, chains, paging=None) -> Snapshot:
        self._in_place.check_capture()
        if chains is not None and len(chains) > 1:
            raise Unsupported("an MLX capture holds one chain: capture one chain at a time")
        held, request = self._current(chains)
        if not held:  # nothing served yet: a snapshot without KV
            return Snapshot(model=self.info, weights=None)
        (tokens, cache), others = held[0], [(cache, tokens) for tokens, cache in held[1:]]
        if request is None:  # a served session: its KV is cache, and no request is left for a restore to run
            return capture(self.model, cache, tokens, info=self.info, finished=True, include_weights=include_weights,
                           paging=paging, others=others)
        snapshot = capture(self.model, cache, tokens, num_prompt_tokens=request.num_prompt, sampler=request.sampler,
                           info=self.info, include_weights=include_weights, paging=paging, others=others)
        snapshot.scheduler.requests[0].id = request.id  # the id a restore resumes it under, as submit named it
        return snapshot

    def check(self, snapshot: Snapshot) -> None:
        expect_snapshot(snapshot)  # as restore: a path is refused by name, not as "'str' object has no attribute"
        validate(snapshot, CorruptSnapshotError)  # a Snapshot built in memory has met none of the reader's rules
        self._checked(snapshot)

    def _checked(self, snapshot: Snapshot) -> tuple[list[Request], Optional[tuple]]:
        """Every check a restore makes of what the snapshot holds (model, cache layout, the pages and layers of
        each sequence, its request in flight and sampler), nothing built: the sequences (engine_requests: the
        request in flight first, if any, then a session per branch of the prefix tree) and _pending's answer. The
        format's structural rules come first (a page's parent before it, only a leaf partial, each request's pages
        the tree's) are the caller's: the reader made them for a file or a segment (restore_source), check and
        restore make them for a Snapshot built in memory."""
        check_snapshot_model(self.model, snapshot, info=self.info)
        self._in_place.check(snapshot)
        check_cache_layout(self.model, snapshot)
        pending = _pending(snapshot)
        if pending:  # the tokens it has not computed go to the model (MLX does not check ids): refused now, not then
            request = pending[0]
            try:
                token_ids(self.model, request.prompt_token_ids + request.output_token_ids)
            except (TypeError, ValueError) as exc:
                raise IncompatibleSnapshotError(f"request {request.id!r}: {exc}") from None
        return check_sequences_kv(snapshot, engine_requests(snapshot, pending and pending[0])), pending

    def restore(self, snapshot: Snapshot) -> list[Resumed]:
        """Replace the engine's state with the snapshot's, its KV written over the arrays of the caches it
        replaces where their shapes fit (_restore_over). The Snapshot is this process's: its bytes are trusted
        as its caller trusts them (thaw_format.sdk.lent's rule; thaw_format.load checked a file's), so only
        what it holds is checked, not its bytes again. Whatever the caller still holds of the old caches (an
        array, an array sharing its memory such as a slice, a layer object, a cache list) keeps its bytes: only
        memory nothing else holds is written over (pages.moved_buffers)."""
        expect_snapshot(snapshot)  # a path is restore_source's
        verify_unchecked(snapshot)  # a segment borrowed or shared-loaded with verify=False (lent's trust rule)
        validate(snapshot, CorruptSnapshotError)  # a Snapshot built in memory has met none of the reader's rules
        return self._restore_over(snapshot)

    def restore_source(self, source: str, *, verified: bool = False) -> list[Resumed]:
        """Restore from shared memory ("shm://name#nbytes") or a snapshot file without a copy of the snapshot
        here; the engine changes only once every check passed.

        A segment is read through a mapping this process keeps (a pool worker's next round reads the same
        segment: no mapping, no page fault), every chunk checked first unless its caller checked them
        (`verified`: a fork pool checks once for all its workers), and the KV is written over the arrays of the
        caches it replaces where their shapes fit (no allocation, no page fault either). Measured on the fork
        pool's 64 MiB trunk, one engine restoring round after round (2 CPUs, load 3.5, both ways side by side):
        a median 75 ms (25-157) when each round mapped the segment, checked each chunk as it scattered it into
        new arrays and unmapped it; 12 ms (8-28) this way, two thirds of it the scatter itself. A file is mapped
        and each KV chunk checked as it is scattered into new arrays (as thaw_mlx.load does; once before, for
        pages several sessions read), its pages dropped once read."""
        checked = checked_by_caller(source, verified)  # refuses verified=True for a file
        if not source.startswith(SHM_PREFIX):
            snapshot, expected = mapped_snapshot(source)
            sequences, pending = self._checked(snapshot)
            return self._install(sequences, caches_of_checked(snapshot, sequences, expected), pending)
        return self._restore_over(open_snapshot(source, verify=not checked))

    def _restore_over(self, snapshot: Snapshot) -> list[Resumed]:
        """Restore a snapshot whose bytes are checked (or trusted) already, writing its KV over the arrays of the
        caches it replaces where their shapes fit, and new arrays elsewhere: every check of what it holds
        (_checked) is made first, with the engine as it was; from then on nothing can refuse it, and the engine
        is left empty while its arrays are written over."""
        sequences, pending = self._checked(snapshot)
        return self._install(sequences, caches_of_checked(snapshot, sequences, spare=self._give_up_buffers), pending)

    def _give_up_buffers(self, wanted: list[list[tuple]]) -> list[list]:
        """Arrays of the engine's caches for a restore that replaces them to write over, one for each array it
        writes, per layer in `wanted` as its (shape, dtype), where one fits (pages.moved_buffers: memory a caller
        holds any part of is copied out first, and keeps its bytes; arrays no wanted one takes are let go of,
        never copied). The engine lets go of its caches and is left empty, so that it never holds a cache half
        written over."""
        caches = [session.cache for session in self.sessions] + [r.release() for r in self.running.values()]
        self.sessions, self.running, self._progress = [], {}, {}
        return moved_buffers(caches, wanted)

    def _install(self, sequences: list[Request], caches: list[list], pending: Optional[tuple]) -> list[Resumed]:
        """Make restored caches the engine's state: with `pending` (_pending's), the first is its one request in
        flight, and every other one a session. Nothing here can refuse the snapshot: that was done before any
        state changed."""
        sessions = [_Session(r.prompt_token_ids + r.output_token_ids, cache) for r, cache in zip(sequences, caches)]
        self._progress, self.running = {}, {}
        if pending is None:
            self.sessions = sessions
            return []
        (request, sampler), session = pending, sessions[0]
        self.sessions = sessions[1:]
        self.running = {request.id: _Request(request.id, self.model, session, len(request.prompt_token_ids), sampler,
                                             request.num_computed_tokens, self.eos)}
        return [Resumed(request.id, request.prompt_token_ids, request.output_token_ids)]

    def page_size(self) -> int:
        """The page thaw_mlx's captures cut a session's cache into (MLX's own cache is not paged)."""
        return DEFAULT_PAGE_SIZE

    def fork(self, n: int, *, context: Sequence[int], processes: bool = False) -> list:
        return fork(self, n, context=context, processes=processes)

    launch_options = {"checkpoint": LocalDirectory}  # what a snapshot file may set (thaw_format.sdk.launch)

    def launch_spec(self) -> LaunchSpec:
        self._in_place.check_launch()
        if self.checkpoint is None:
            raise Unsupported("fork into processes needs a model loaded from a checkpoint (MLXEngine.start)")
        return LaunchSpec(f"{__name__}:MLXEngine.start", {"checkpoint": self.checkpoint})

    def close(self) -> None:
        self.sessions, self.running, self._progress = [], {}, {}


def _pending(snapshot: Snapshot) -> Optional[tuple]:
    """The snapshot's request a restore resumes and its sampler, or None (a snapshot of an idle prefix cache
    has none: its branches become sessions); more than one, or a sampler MLX cannot apply, is refused here,
    before a restore changes anything."""
    pending = [r for r in pending_requests(snapshot)
               if r.sampling.max_tokens is not None and len(r.output_token_ids) < r.sampling.max_tokens]
    if len(pending) > 1:
        raise IncompatibleSnapshotError(f"an MLX engine resumes one request in flight; the snapshot holds "
                                        f"{len(pending)}")
    return (pending[0], request_sampler(pending[0])) if pending else None


def _eos_ids(checkpoint: Optional[str]) -> frozenset:
    """The end-of-sequence ids a checkpoint's config names (none for a model without one): where a request
    stops unless it ignores EOS."""
    if checkpoint is None:
        return frozenset()
    eos = json.loads((Path(checkpoint) / "config.json").read_text()).get("eos_token_id")
    return frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
