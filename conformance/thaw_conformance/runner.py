"""The checks of one engine and architecture, in two processes.

The parent phase serves the workload, captures a snapshot and records what the parent itself does next
(its continuations, its in-flight requests finishing). The child phase runs in a fresh process: it restores
the snapshot and must do exactly what the parent did, byte for byte and token for token.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import thaw_format
from thaw_format import CorruptSnapshotError, IncompatibleSnapshotError
from thaw_format.sdk import Awake, SleptNotClosed, factories, sleep, wake
from thaw_format.sdk.shared import restore_source
from thaw_format.sdk.sleep import launch_record

from . import sleep_wake, variants
from .checked import checked
from .compare import float_bits, kv_diff, weights_diff
from .results import CheckFailed, Recorder
from .sdk import Driver, Engine, Generation, Unsupported, Workload, greedy, seeded

PARENT_RECORD = "parent.json"  # the parent phase's record, read by the child phase


def _generation(g: Generation) -> dict:
    return {"tokens": list(g.token_ids), "cached": g.cached_tokens, "logprobs": float_bits(g.logprobs)}


def _features(engine: Engine) -> frozenset:
    return engine.features


def _save(snapshot, path: Path) -> Path:
    thaw_format.save(snapshot, path)
    return path


def _restore(engine: Engine, path) -> list:
    """Load the file (the reader verifies its checksums) and restore it: a damaged file is refused either way."""
    return engine.restore(thaw_format.load(path))


def _live_weights(engine: Engine):
    return engine.capture(include_weights=True).weights.tensors


def _live_kv(engine: Engine):
    return engine.capture(include_weights=False)


def _try(fn):
    """fn()'s result, or the Unsupported reason as a string (a check reports it later)."""
    try:
        return fn()
    except Unsupported as exc:
        return f"unsupported: {exc}"


def parent_phase(driver: Driver, arch: str, workdir: Path, workload: Workload) -> dict:
    """Serve, capture, and record the parent's own next steps; writes workdir/parent.json and returns it."""
    w = workload
    record: dict = {"arch": arch, "timings": {}}
    started = time.perf_counter()
    engine = checked(driver.start(arch, workdir))
    features = _features(engine)
    record["timings"]["start_s"] = time.perf_counter() - started
    try:
        first = engine.generate(w.prompt, greedy(w.first_tokens))
        record["first"] = first.token_ids
        snapshot = workdir / "snapshot.thaw"
        started = time.perf_counter()
        _save(engine.capture(), snapshot)
        record["timings"]["capture_s"] = time.perf_counter() - started
        record["timings"]["snapshot_bytes"] = snapshot.stat().st_size
        stored = thaw_format.load(snapshot)
        record["weights_parent"] = _try(lambda: weights_diff(stored.weights.tensors, _live_weights(engine))
                                        if stored.weights else "the snapshot holds no weights")
        record["kv_parent"] = _try(lambda: kv_diff(stored, _live_kv(engine)))
        prompt = w.prompt + first.token_ids
        record["continuations"] = {"greedy": _generation(engine.generate(prompt, greedy(w.continue_tokens)))}
        if "seeded" in features:
            record["continuations"]["seeded"] = _generation(engine.generate(prompt, seeded(w.seed, w.continue_tokens)))
        if "fork_processes" in features and (w.fork_archs is None or arch in w.fork_archs):
            record["fork"] = [engine.generate(prompt, _fork_sampling(features, w, i)).token_ids
                              for i in range(w.fork_n)]
        record["mid_stream_after"] = w.mid_stream_after
        record["mid_stream"] = _mid_stream(engine, features, w, workdir)
        record["sleep"] = _sleep(engine, arch, w, workdir)  # last: a sleep closes the engine
    finally:
        if not record.get("sleep", {}).get("closed"):
            engine.close()
    record["damaged"] = {k: str(p) for k, p in variants.damaged(snapshot, workdir).items()}
    record["other_models"] = {k: str(p) for k, p in variants.other_models(snapshot, workdir).items()}
    record["noise_kv"] = str(variants.noise_kv(snapshot, workdir / "noise_kv.thaw"))
    record["snapshot"] = str(snapshot)
    (workdir / PARENT_RECORD).write_text(json.dumps(record, indent=1))
    return record


def _sleep(engine: Engine, arch: str, w: Workload, workdir: Path) -> dict:
    """Put the parent to sleep with requests in flight (thaw_conformance.sleep_wake); the child phase wakes it. Two
    requests, or one where the adapter's snapshot resumes one request (MLX: sleep refuses two, the engine serving).
    The record's "closed": sleep closed the engine (or tried to), so the parent must not close it again (a failed
    save or a refusal leaves it open)."""
    if w.fork_archs is not None and arch not in w.fork_archs:
        return {"skipped": f"the sleep/wake check ran on {', '.join(w.fork_archs)} only (--fork-arch)"}
    lacking = [m for m in ("launch_spec", "page_size") if not callable(getattr(engine.engine, m, None))]
    if "mid_stream" not in engine.features or lacking:
        return {"unsupported": "sleep with requests in flight needs 'mid_stream', launch_spec() and page_size()"}
    path = workdir / "slept.thaw"
    refused, slept = "", False
    try:
        trunk = sleep_wake.trunk_for(engine.engine.page_size())  # two of its pages and a partial one
        in_flight = sleep_wake.in_flight_on(trunk)
        for prompts in (in_flight, in_flight[:1]):
            try:
                _, want = sleep_wake.run_midway(engine, prompts)
                sleep(engine.engine, path)  # the adapter itself: sleep reads its class's capabilities and options
            except Unsupported as exc:  # refused before anything was written or closed: the engine serves on
                engine.finish()
                refused = str(exc)
                continue
            slept = True
            factory = launch_record(thaw_format.load(path)).factory
            return {"path": str(path), "want": want, "prompts": prompts, "trunk": trunk, "factory": factory,
                    "closed": True}
    except SleptNotClosed as exc:  # the file is whole and closing failed: not tried again
        return {"error": f"the parent's sleep: {exc}: {exc.__cause__}", "closed": True}
    except CheckFailed as exc:  # a broken contract rule (ContractViolation): the check's verdict is "failed"
        return {"failed": f"the parent's sleep: {exc}", "closed": slept}
    except Exception as exc:  # the check's verdict (the child records it); the parent's other records stand
        return {"error": f"the parent's sleep failed: {type(exc).__name__}: {exc}", "closed": slept}
    return {"unsupported": refused}


def _compare_sleep(record: dict, recorder: Recorder) -> None:
    """Wake the parent's sleep in this process, after the child's own engine is closed (one engine at a time),
    and finish the requests it slept with. The suite trusts the factory its own parent recorded: a driver outside
    thaw names one that wake would refuse on a file's word."""
    slept = record["sleep"]
    if "skipped" in slept:
        recorder.add("sleep_wake", "skipped", slept["skipped"])
        return
    with recorder.check("sleep_wake") as note:
        if "unsupported" in slept:
            raise Unsupported(slept["unsupported"])
        if "failed" in slept:
            raise CheckFailed(slept["failed"])
        if "error" in slept:
            raise RuntimeError(slept["error"])
        factory = None if slept["factory"] in factories.REGISTERED else slept["factory"]
        awake = wake(slept["path"], factory=factory)
        try:
            note(sleep_wake.check_woken(Awake(checked(awake.engine), awake.resumed), slept["want"], slept["prompts"],
                                        slept["trunk"]))
        finally:
            awake.engine.close()


def _fork_sampling(features, w: Workload, child: int) -> thaw_format.SamplingParams:
    """Each fork child samples with its own seed, so that independent children must differ (greedy if the
    engine cannot sample with a seed)."""
    return seeded(w.seed + 1 + child, w.continue_tokens) if "seeded" in features else greedy(w.continue_tokens)


def _mid_stream(engine: Engine, features, w: Workload, workdir: Path) -> dict:
    """Per kind, a request submitted, stepped part-way, captured in flight, then finished by the parent."""
    record: dict = {"requests": {}, "unsupported": {}}
    for i, (kind, feature, sampling) in enumerate((("greedy", "mid_stream", greedy(w.mid_stream_tokens)),
                                                   ("seeded", "mid_stream_seeded",
                                                    seeded(w.seed, w.mid_stream_tokens)))):
        if feature not in features:
            record["unsupported"][kind] = f"capturing a {kind} request in flight"
            continue
        try:
            rid = engine.submit(w.prompt[::-1][: 40 + 3 * i], sampling)
        except Unsupported as exc:
            record["unsupported"][kind] = str(exc)
            continue
        for _ in range(w.mid_stream_after):
            engine.step()
        path = workdir / f"mid_stream_{kind}.thaw"
        _save(engine.capture(), path)
        record["requests"][kind] = {"id": rid, "tokens": engine.finish()[rid].output_token_ids, "path": str(path)}
    return record


def child_phase(driver: Driver, arch: str, workdir: Path, workload: Workload, recorder: Recorder) -> dict:
    """Restore in this fresh process and compare everything with the parent's record; returns timings."""
    record = json.loads((workdir / PARENT_RECORD).read_text())
    timings = {}
    started = time.perf_counter()
    engine = checked(driver.start(arch, workdir))
    timings["start_s"] = time.perf_counter() - started
    try:
        started = time.perf_counter()
        try:
            _restore(engine, record["snapshot"])
        except Exception as exc:
            recorder.missing("error", f"restoring the snapshot failed: {type(exc).__name__}: {exc}")
            return timings
        timings["restore_s"] = time.perf_counter() - started
        for stage, checks in _STAGES:
            try:
                stage(engine, driver, record, workload, recorder)
            except Exception as exc:  # a crash between checks: its group's remaining checks are errors
                recorder.missing("error", f"{stage.__name__} crashed: {type(exc).__name__}: {exc}", checks)
    finally:
        engine.close()
    _compare_sleep(record, recorder)
    return timings


def _refusals(engine: Engine, driver: Driver, record: dict, w: Workload, recorder: Recorder) -> None:
    """Damaged files and other models' snapshots are refused, by `check` too, and leave the engine, which holds
    the pages of the checks before, as it was: a restore that changes state before it refuses is caught."""
    before = _try(lambda: _live_kv(engine))
    with recorder.check("corrupt_refused") as note:
        for label, path in record["damaged"].items():
            note(_expect_refusal(engine, path, CorruptSnapshotError, label))
        note(_untouched(engine, before))
    with recorder.check("wrong_model_refused") as note:
        for label, path in record["other_models"].items():
            note(_expect_refusal(engine, path, IncompatibleSnapshotError, label))
        note(_untouched(engine, before))


_REFUSING = {  # the contract: each refuses what does not fit; a damaged file is refused by its load first
    "check": lambda engine, path: engine.check(thaw_format.load(path)),
    "restore": lambda engine, path: engine.restore(thaw_format.load(path)),
    "restore_source": lambda engine, path: restore_source(engine, str(path)),  # the adapter reads the file itself
}


def _expect_refusal(engine: Engine, path: str, error: type, label: str) -> str:
    for step, refuse in _REFUSING.items():
        try:
            refuse(engine, path)
        except error:
            continue
        except Exception as exc:
            raise CheckFailed(f"{label}: {step} raised {type(exc).__name__} ({exc}), not {error.__name__}") from exc
        raise CheckFailed(f"{label}: {step} accepted it without an error" if step == "check" else
                          f"{label}: {step} restored it without an error")
    return f"{label}: {error.__name__}"


def _untouched(engine: Engine, before) -> str:
    """The engine's KV after refused restores is `before`'s (its live KV before them), page for page and byte
    for byte: contract, "before any engine state changes"."""
    if isinstance(before, str):
        return f"engine state after refusal not readable ({before})"
    after = _live_kv(engine)
    counts = [s.prefix.num_pages if s.prefix is not None else 0 for s in (before, after)]
    diff = kv_diff(before, after) if counts[0] and counts[0] == counts[1] else None
    if counts[0] != counts[1] or diff:
        raise CheckFailed(f"a refused restore changed the engine: it held {counts[0]} cached pages before, "
                          f"{counts[1]} after" + (f" ({diff})" if diff else "") + "; the contract wants every "
                          "check before any engine state changes")
    return f"the engine's {counts[0]} cached pages unchanged, byte for byte"


def _verdict(diff_child, diff_parent, what: str) -> str:
    for side, diff in (("parent's live state vs snapshot", diff_parent), ("restored vs snapshot", diff_child)):
        if isinstance(diff, str) and diff.startswith("unsupported: "):
            raise Unsupported(f"{what}: {diff[len('unsupported: '):]}")
        if diff:
            raise CheckFailed(f"{side}: {diff}")
    return f"{what}: parent, file and restored engine byte-identical"


def _compare_state(engine: Engine, driver: Driver, record: dict, w: Workload, recorder: Recorder) -> None:
    stored = thaw_format.load(record["snapshot"])
    with recorder.check("weights_identical") as note:
        if stored.weights is None or not stored.weights.tensors:
            raise Unsupported("the adapter's snapshot holds no weights")
        note(_verdict(weights_diff(stored.weights.tensors, _live_weights(engine)), record["weights_parent"],
                      f"{len(stored.weights.tensors)} tensors, {sum(t.nbytes for t in stored.weights.tensors.values())} bytes"))
    with recorder.check("kv_identical") as note:
        note(_verdict(_try(lambda: kv_diff(stored, _live_kv(engine))), record["kv_parent"],
                      f"{stored.kv.num_pages} pages x {len(stored.kv.layers)} layers"))


def _same(got: Generation, want: dict, what: str) -> None:
    if got.token_ids != want["tokens"]:
        raise CheckFailed(f"{what}: restored gave {got.token_ids}, the parent {want['tokens']}")


def _compare_continuations(engine: Engine, driver: Driver, record: dict, w: Workload, recorder: Recorder) -> None:
    prompt = w.prompt + record["first"]
    want = record["continuations"]
    features = _features(engine)
    got = {"greedy": engine.generate(prompt, greedy(w.continue_tokens))}
    with recorder.check("prefix_hit_fresh_process") as note:
        cached, parent = got["greedy"].cached_tokens, want["greedy"]["cached"]
        if cached != parent or cached <= 0:
            raise CheckFailed(f"the restored engine reports {cached} cached tokens, the parent {parent}")
        note(f"{cached} of {len(prompt)} prompt tokens cached, as in the parent")
    with recorder.check("continuation_greedy") as note:
        _same(got["greedy"], want["greedy"], "greedy")
        note(f"{len(want['greedy']['tokens'])} tokens identical")
        if len(set(want["greedy"]["tokens"])) == 1:
            note("weak evidence: this model's greedy output repeats one token (the seeded check is the strong one)")
    with recorder.check("continuation_seeded") as note:
        if "seeded" not in features:
            raise Unsupported("seeded sampling")
        got["seeded"] = engine.generate(prompt, seeded(w.seed, w.continue_tokens))
        _same(got["seeded"], want["seeded"], "seeded")
        note(f"{len(want['seeded']['tokens'])} tokens identical (seed {w.seed})")
    with recorder.check("logprobs_identical") as note:
        if "logprobs" not in features:
            raise Unsupported("the engine exposes no logprobs through the adapter")
        for kind, generation in got.items():
            if float_bits(generation.logprobs) != want[kind]["logprobs"]:
                raise CheckFailed(f"{kind}: logprobs differ in their bits from the parent's")
        note(f"{', '.join(got)}: every logprob bit-identical")


def _compare_streaming(engine: Engine, driver: Driver, record: dict, w: Workload, recorder: Recorder) -> None:
    """The parent's continuations again, submitted together and stepped: each step advances a request by at most
    one token, progress() reports it, its last Progress (finished) once, and each ends with the parent's tokens."""
    with recorder.check("streaming") as note:
        features = _features(engine)
        if "streaming" not in features:
            raise Unsupported("several requests in flight, each one's tokens after every step (progress())")
        prompt, want = w.prompt + record["first"], record["continuations"]
        kinds = {engine.submit(prompt, greedy(w.continue_tokens) if kind == "greedy" else
                               seeded(w.seed, w.continue_tokens)): kind for kind in want}
        seen, finished = {rid: [] for rid in kinds}, set()
        try:
            for _ in range(4 * w.continue_tokens + 16):  # a step may only admit a request: allow a few
                # before the first step too: a submit may run its request's prefill, its first token
                for rid, progress in engine.progress().items():
                    _streamed(rid, progress, kinds, seen, finished)
                if finished == set(kinds):
                    break
                engine.step()
        finally:
            if finished != set(kinds):  # the checks after this one need an idle engine
                engine.finish()
        if finished != set(kinds):
            raise CheckFailed(f"after {4 * w.continue_tokens + 16} steps progress() has reported "
                              f"{sorted(kinds[r] for r in finished)} finished of {sorted(kinds.values())}")
        for rid, kind in kinds.items():
            if seen[rid] != want[kind]["tokens"]:
                raise CheckFailed(f"{kind} request streamed beside the others gave {seen[rid]}, the parent's "
                                  f"{want[kind]['tokens']} alone")
        note(f"{', '.join(kinds.values())} in flight together: a token per step at most, the parent's tokens; "
             + _aborted_beside(engine, prompt, want["greedy"]["tokens"], w))


def _aborted_beside(engine: Engine, prompt: list, want: list, w: Workload) -> str:
    """abort (part of "streaming"): of two greedy requests for the parent's continuation, the one submitted first
    (far longer) is aborted mid-stream. It is reported once, finished and aborted, with the tokens last reported
    (a prefix of the parent's); the other ends with the parent's tokens; then neither is in flight: a second abort
    gives False, no capture or finish holds them, and the engine serves the prompt their pages held again."""
    gone = engine.submit(prompt, greedy(4 * w.continue_tokens + 16))
    kept = engine.submit(prompt, greedy(w.continue_tokens))
    try:
        return _abort_one(engine, prompt, want, w, gone, kept)
    except CheckFailed:
        engine.finish()  # the checks after this one need an idle engine
        raise


def _abort_one(engine: Engine, prompt: list, want: list, w: Workload, gone: str, kept: str) -> str:
    last: dict = {}
    for _ in range(2):
        last.update(engine.progress())
        engine.step()
    for rid, progress in engine.progress().items():
        last[rid] = progress
    if last.get(gone) is not None and last[gone].finished:
        raise CheckFailed(f"a request of {4 * w.continue_tokens + 16} tokens finished in 2 steps")
    if engine.abort(gone) is not True:
        raise CheckFailed("abort() of a request in flight gave False")
    before = list(last[gone].token_ids) if gone in last else []
    if before != want[: len(before)]:
        raise CheckFailed(f"the request aborted later gave {before} before its abort, the parent {want}")
    finals: dict = {}
    for _ in range(4 * w.continue_tokens + 16):
        for rid, progress in engine.progress().items():
            if rid in finals:
                raise CheckFailed(f"progress() reports request {rid} again after its finished Progress"
                                  + (" (an aborted request must be gone)" if rid == gone else ""))
            if rid not in (gone, kept):
                raise CheckFailed(f"progress() names {rid!r}, not a request submitted here")
            if progress.finished:
                finals[rid] = progress
        if kept in finals:
            break
        engine.step()
    got = finals.get(gone)
    if got is None or not got.aborted or list(got.token_ids) != before:
        raise CheckFailed(f"the aborted request's last Progress must be reported once, aborted=True, with its "
                          f"tokens as last reported ({before}); got {got}")
    if kept not in finals or finals[kept].aborted or list(finals[kept].token_ids) != want:
        raise CheckFailed(f"the request beside the aborted one gave {finals.get(kept)}, the parent's {want} alone")
    if engine.abort(gone) or engine.abort(kept) or engine.abort("no-such-request"):
        raise CheckFailed("abort() of an aborted, a finished or an unknown request gave True")
    snapshot = engine.capture(include_weights=False)
    held = {r.id for r in snapshot.scheduler.requests} if snapshot.scheduler is not None else set()
    left = set(engine.finish())
    if held & {gone, kept} or left & {gone, kept}:
        raise CheckFailed(f"after the abort a capture holds {sorted(held & {gone, kept})}, finish() ran "
                          f"{sorted(left & {gone, kept})}")
    again = engine.generate(prompt, greedy(w.continue_tokens)).token_ids
    if again != want:
        raise CheckFailed(f"after the abort the engine gave {again} for the prompt, the parent {want}")
    return f"one aborted mid-stream after {len(before)} tokens: reported once, gone, its pages served again"


def _streamed(rid: str, progress, kinds: dict, seen: dict, finished: set) -> None:
    if rid not in kinds:
        raise CheckFailed(f"progress() names {rid!r}, not a request submitted here ({sorted(kinds)})")
    if rid in finished:
        raise CheckFailed(f"progress() reports request {rid} again after its finished Progress")
    before, now = seen[rid], list(progress.token_ids)
    if now[: len(before)] != before or len(now) > len(before) + 1:
        raise CheckFailed(f"one step took request {rid} from {len(before)} tokens to {len(now)} ({now}): at most "
                          "one more token, the earlier ones kept")
    seen[rid] = now
    if progress.finished:
        finished.add(rid)


def _compare_mid_stream(engine: Engine, driver: Driver, record: dict, w: Workload, recorder: Recorder) -> None:
    mid = record["mid_stream"]
    for kind, check in (("greedy", "mid_stream_resume"), ("seeded", "mid_stream_resume_seeded")):
        with recorder.check(check) as note:
            if kind not in mid["requests"]:
                raise Unsupported(mid["unsupported"][kind])
            want = mid["requests"][kind]
            _restore(engine, want["path"])
            done = engine.finish().get(want["id"])
            got = None if done is None else done.output_token_ids
            if got != want["tokens"]:
                raise CheckFailed(f"request {want['id']} finished as {got}, in the parent as {want['tokens']}")
            note(f"{len(got)} tokens identical, {len(got) - record['mid_stream_after']} of them after the restore")


def _control(engine: Engine, driver: Driver, record: dict, w: Workload, recorder: Recorder) -> None:
    with recorder.check("kv_control") as note:
        _restore(engine, record["noise_kv"])
        got = engine.generate(w.prompt + record["first"], greedy(w.continue_tokens))
        want = record["continuations"]["greedy"]
        if got.cached_tokens != want["cached"]:
            raise CheckFailed(f"noise KV: {got.cached_tokens} cached tokens, expected {want['cached']}: not hit")
        if got.token_ids != want["tokens"]:
            note(f"noise KV hit ({got.cached_tokens} tokens) and changed the output tokens")
        elif got.logprobs is not None and float_bits(got.logprobs) != want["logprobs"]:
            note(f"noise KV hit ({got.cached_tokens} tokens) and changed the logprobs (the tokens stayed: "
                 "the model's greedy output is insensitive)")
        else:
            raise CheckFailed("noise KV under the same hashes gave the same output: the restored bytes are not read")


def _compare_fork(engine: Engine, driver: Driver, record: dict, w: Workload, recorder: Recorder) -> None:
    """Fork the freshly restored engine; each child must continue as the parent did under the child's seed."""
    if w.fork_archs is not None and record["arch"] not in w.fork_archs:
        recorder.add("fork_n", "skipped", f"the fork check ran on {', '.join(w.fork_archs)} only (--fork-arch)")
        return
    with recorder.check("fork_n") as note:
        features = _features(engine)
        if "fork_processes" not in features:
            raise Unsupported("fork into other processes")
        prompt = w.prompt + record["first"]
        children = engine.fork(w.fork_n, context=prompt, processes=True)
        try:
            for i, (child, want) in enumerate(zip(children, record["fork"])):
                sampling = _fork_sampling(features, w, i)
                got = child.generate(prompt, sampling).token_ids
                if got != want:
                    how = "greedy" if sampling.temperature == 0 else f"seed {sampling.seed}"
                    raise CheckFailed(f"child {i} gave {got}, the parent under {how} {want}")
        finally:
            for child in children:
                child.close()
        note(f"{len(children)} children, each identical to the parent under "
             + ("its own seed" if "seeded" in features else "greedy decoding"))


_STAGES = (
    (_compare_state, ("weights_identical", "kv_identical")),
    (_compare_fork, ("fork_n",)),
    (_compare_continuations, ("prefix_hit_fresh_process", "continuation_greedy", "continuation_seeded",
                              "logprobs_identical")),
    (_compare_streaming, ("streaming",)),
    (_compare_mid_stream, ("mid_stream_resume", "mid_stream_resume_seeded")),
    (_control, ("kv_control",)),
    (_refusals, ("corrupt_refused", "wrong_model_refused")),
)
