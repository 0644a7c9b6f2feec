"""Deliberately wrong adapters (the toy template with one fault each): the suite must catch every fault."""

from __future__ import annotations

import dataclasses

import numpy as np

import thaw_format
from thaw_conformance.sdk import Unsupported
from thaw_format.sdk import Progress
from thaw_conformance.template import adapter
from thaw_conformance.template.adapter import ToyThawEngine
from thaw_conformance.template.driver import ToyDriver


class ZeroKV(ToyThawEngine):
    """Rebuilds the prefix table but leaves the KV pages zero."""

    def restore(self, snapshot):
        resumed = super().restore(snapshot)
        for k, v in zip(self.engine.k, self.engine.v):
            k[:] = 0
            v[:] = 0
        return resumed


class Recomputes(ToyThawEngine):
    """Ignores the stored KV and recomputes every page from its tokens: the KV control must notice."""

    def restore(self, snapshot):
        adapter.check(self.engine, snapshot)
        self.engine.reset()
        for leaf in snapshot.prefix.leaves():
            self.engine.generate(snapshot.prefix.chain_tokens(leaf), 1)
        return []


class DropsRNG(ToyThawEngine):
    """Resumes seeded requests with a fresh generator instead of the captured state."""

    def restore(self, snapshot):
        resumed = super().restore(snapshot)
        for request in self.engine.running.values():
            if request.rng is not None:
                request.rng = np.random.default_rng(0)
        return resumed


class NoModelCheck(ToyThawEngine):
    """Restores into whatever engine it is given, as long as the KV shapes fit."""

    def restore(self, snapshot):
        model = dataclasses.replace(snapshot.model, **dataclasses.asdict(adapter.model_info(self.engine)))
        return super().restore(dataclasses.replace(snapshot, model=model))


class NoKVReadback(ToyThawEngine):
    """An adapter that cannot read its KV back: kv_identical must say so, not pass."""

    def capture(self, *, include_weights=True, chains=None):
        if not include_weights:
            raise Unsupported("reading KV back")
        return super().capture(include_weights=include_weights, chains=chains)


class ClearsBeforeRefusing(ToyThawEngine):
    """Drops its cached pages, then checks: a snapshot it refuses leaves the engine emptied."""

    def restore(self, snapshot):
        self.engine.reset()
        return super().restore(snapshot)


class CheckAcceptsAll(ToyThawEngine):
    """`check` accepts anything (restore still refuses a wrong model): the contract's check is broken."""

    def check(self, snapshot):
        return None


class MisspeltCapability(ToyThawEngine):
    @classmethod
    def capabilities(cls):
        return frozenset({"logprobs", "seeded", "fork-processes"})


class CaptureNotASnapshot(ToyThawEngine):
    def capture(self, *, include_weights=True, chains=None):
        return {"snapshot": super().capture(include_weights=include_weights, chains=chains)}


class DeclaredLogprobsMissing(ToyThawEngine):
    """Declares "logprobs" but leaves Generation.logprobs empty: the logprob check must not pass on None == None."""

    def generate(self, prompt, params):
        return dataclasses.replace(super().generate(prompt, params), logprobs=None)


class SourceUnchecked(ToyThawEngine):
    """Reads a snapshot file for restore_source without checking its chunks (a flipped byte gets through)."""

    def restore_source(self, source, *, verified=False):
        return self.restore(thaw_format.load(source, verify=False))


class AbortLeavesRunning(ToyThawEngine):
    """abort() reports the request aborted but leaves it running, its blocks held: it goes on being stepped."""

    def abort(self, request_id):
        request = self.engine.running.get(request_id)
        if request is None:
            return False
        self._progress[request_id] = Progress(list(request.output), request.cached_tokens, True, aborted=True)
        return True


class AbortReturnsNothing(ToyThawEngine):
    """abort() drops the request but returns None: a caller cannot tell in flight from unknown."""

    def abort(self, request_id):
        super().abort(request_id)


class HoldsOneRequest(ToyThawEngine):
    """capture() holds the first request in flight only (as thaw_sglang's left out those waiting in its queue):
    a single request captured in flight resumes, but a sleep with two loses one."""

    def capture(self, *, include_weights=True, chains=None):
        snapshot = super().capture(include_weights=include_weights, chains=chains)
        if snapshot.scheduler:
            del snapshot.scheduler.requests[1:]
        return snapshot


class Minimal(ToyThawEngine):
    """The core methods only: no submit/step/finish, launch_spec or page_size (a third party's first adapter)."""
    submit = step = finish = progress = abort = fork = launch_spec = page_size = None


class WakesSayingLargePages(ToyThawEngine):
    """Sleeps with pages of 4 tokens (the sleep check's trunk is 70) and wakes as an engine that says its pages hold
    128: no restored page could be seen read in the woken engine's cached-token count."""

    def launch_spec(self):
        spec = super().launch_spec()
        return type(spec)(f"{__name__}:SaysLargePages.start", spec.kwargs)


class SaysLargePages(ToyThawEngine):
    def page_size(self):
        return 128


class BusyIdsNotStr(ToyThawEngine):
    """submit() returns an int id when a request is already in flight (a counter leaking out): only a sleep with
    two requests in flight breaks the contract."""

    def submit(self, prompt, params):
        rid = super().submit(prompt, params)
        return rid if len(self.engine.running) == 1 else len(self.engine.running)


class CloseFailsInFlight(ToyThawEngine):
    """close() shuts the engine down but raises with requests in flight (as in a sleep), and a second close fails."""

    def close(self):
        if self.engine is None:
            raise RuntimeError("closed twice")
        busy = bool(self.engine.running)
        super().close()
        if busy:
            raise OSError("close failed with requests in flight")


def _factory(engine_class, capabilities=None):
    if capabilities is not None:
        engine_class.capabilities = classmethod(lambda cls: frozenset(capabilities))

    class Driver(ToyDriver):
        name = f"broken-{engine_class.__name__}"

        def start(self, arch, workdir):
            return engine_class(super().start(arch, workdir).engine)

    return Driver


def zero_kv():
    return _factory(ZeroKV)()


def recomputes():
    return _factory(Recomputes)()


def drops_rng():
    return _factory(DropsRNG)()


def no_model_check():
    return _factory(NoModelCheck)()


def no_kv_readback():
    return _factory(NoKVReadback, capabilities={"seeded"})()


def holds_one_request():
    return _factory(HoldsOneRequest)()


def cannot_start():
    """A driver whose adapter cannot serve the architecture at all: start raises Unsupported."""
    class Driver(ToyDriver):
        name = "broken-cannot-start"

        def start(self, arch, workdir):
            raise Unsupported(f"no {arch} here: the adapter lacks this model's cache layout")

    return Driver()


def clears_before_refusing():
    return _factory(ClearsBeforeRefusing)()


def check_accepts_all():
    return _factory(CheckAcceptsAll)()


def misspelt_capability():
    return _factory(MisspeltCapability)()


def capture_not_a_snapshot():
    return _factory(CaptureNotASnapshot)()


def declared_logprobs_missing():
    return _factory(DeclaredLogprobsMissing)()


def silent_progress():
    """transformers' engine (the cheapest real one that streams) whose progress() reports nothing."""
    from thaw_conformance.drivers.transformers import TransformersDriver
    from thaw_conformance.models import checkpoint
    from thaw_transformers import TransformersEngine

    class SilentProgress(TransformersEngine):
        def progress(self):
            return {}

    class Driver(TransformersDriver):
        name = "broken-silent-progress"

        def start(self, arch, workdir):
            return SilentProgress.start(str(checkpoint(arch)))

    return Driver()


def source_unchecked():
    return _factory(SourceUnchecked)()


def not_installed():
    """A driver whose engine is not installed here: importing the engine fails inside the driver, as `import vllm`
    does where vLLM is absent. The suite skips it, saying why; a misspelt driver is a usage error instead."""
    raise ImportError("the engine is not installed here")


def abort_leaves_running():
    return _factory(AbortLeavesRunning)()


def abort_returns_nothing():
    return _factory(AbortReturnsNothing)()


def minimal():
    return _factory(Minimal, capabilities={"seeded"})()


def wakes_saying_large_pages():
    return _factory(WakesSayingLargePages)()


def busy_ids_not_str():
    return _factory(BusyIdsNotStr)()


def close_fails_in_flight():
    return _factory(CloseFailsInFlight)()
