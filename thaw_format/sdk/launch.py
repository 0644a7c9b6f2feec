"""Launch arguments a snapshot file may carry: each adapter's allowlist of options (its `launch_options`).

A file's launch arguments are untrusted input, and an engine's options reach far: vLLM's and SGLang's take
classes, hooks, plugins and loaders named by path, storage backends with their own config, network endpoints,
log config files, and a model id the engine downloads. A list of the dangerous ones is never complete, so each
adapter class declares the few options an equal engine needs, next to its `launch_spec`:

    launch_options = {"model": LocalDirectory, "dtype": str, "block_size": int, ...}   # name -> type of value

The types are plain scalars (str, int, float, bool; None always means the engine's default), LocalDirectory: a str
naming a directory that exists here (a model, a tokenizer), never a hub id to fetch, and OneOf(values...): one of a
few named values (an option whose other values fetch weights from elsewhere or run a plugin). `sleep` writes these
only (so secrets such as tokens never reach the file), and `wake` starts an engine with them only; anything else
the caller passes again, in `overrides`: `sleep` refuses an engine started with an argument not on the list unless
its caller names it in `given_at_wake`, and `wake` then refuses to start one unless `overrides` sets it. The table
is the adapter's: this module knows no engine's options.
"""

from __future__ import annotations

import os
import reprlib
from typing import Callable, Collection, Mapping, Optional

from ..errors import SnapshotError
from .contract import LaunchSpec, Unsupported


class LocalDirectory:
    """The type of a launch option naming a local directory: a str path to a directory that exists."""


class OneOf:
    """The type of a launch option with a closed set of values: OneOf("auto", "safetensors") allows those only."""

    def __init__(self, *values):
        self.values = values

    def __repr__(self):
        return f"one of {', '.join(map(repr, self.values))}"


class RefusedLaunch(SnapshotError):
    """The file names an engine factory, or launch arguments, that `wake` does not start an engine with on a
    file's word (the message names them); nothing was started."""


SCALARS = (str, int, float, bool, type(None))
_shown = reprlib.Repr()  # a file's values in messages: a path whole, anything huge cut
_shown.maxstring = _shown.maxother = 300


def checked_launch_spec(spec, taker: str) -> LaunchSpec:
    """The launch spec of `spec` (a LaunchSpec, or a contract engine's launch_spec()) that `taker` (a name, for
    the error) was given; TypeError otherwise."""
    if not isinstance(spec, LaunchSpec):
        if not callable(getattr(spec, "launch_spec", None)):
            raise TypeError(f"{taker} takes a contract engine (thaw_format.sdk.Engine, with launch_spec()) or a "
                            f"LaunchSpec, not {type(spec).__name__} {reprlib.repr(spec)}")
        spec = spec.launch_spec()
        if not isinstance(spec, LaunchSpec):
            raise TypeError(f"the engine's launch_spec() returned {type(spec).__name__}, not a LaunchSpec")
    return spec


def startable_launch_spec(spec, taker: str) -> LaunchSpec:
    """checked_launch_spec, for a taker that starts engines from it (a process fork, a fork pool): Unsupported if
    the engine was started with arguments its spec cannot hold (`unrecorded`), since an engine started from
    `kwargs` alone would differ from it without a word."""
    spec = checked_launch_spec(spec, taker)
    if spec.unrecorded:
        raise Unsupported(f"{taker}: the engine was started with {', '.join(sorted(spec.unrecorded))}, which its "
                          "launch spec cannot hold (not JSON-able), so an engine started from it would differ: start "
                          "the engine with JSON-able arguments, or pass a LaunchSpec that holds them")
    return spec


def launch_options(factory: Callable) -> Mapping[str, object]:
    """The options a file may set for `factory`: the `launch_options` of the class whose classmethod it is
    (MyEngine.start), or of the factory itself; none ({}) if it declares none."""
    owner = getattr(factory, "__self__", None)
    return getattr(owner, "launch_options", None) or getattr(factory, "launch_options", None) or {}


def option_problem(key: str, value, options: Optional[Mapping[str, type]]) -> Optional[str]:
    """Why the file may not set `key` to `value` (None: it may). `options` None: the adapter's list is not known
    yet (its module not imported), so only whether the value is a plain one."""
    if options is None:
        return None if isinstance(value, SCALARS) else f"{key}={_shown.repr(value)} (not a plain value)"
    if key not in options:
        return f"{key} (not one of the options a file may set: {', '.join(sorted(options)) or 'none'})"
    kind = options[key]
    if value is None:
        return None
    if kind is LocalDirectory:
        ok = isinstance(value, str) and os.path.isdir(value)
        return None if ok else f"{key}={_shown.repr(value)} (not an existing local directory)"
    if isinstance(kind, OneOf):
        ok = any(type(value) is type(allowed) and value == allowed for allowed in kind.values)  # True is not 1
        return None if ok else f"{key}={_shown.repr(value)} (not {kind!r})"
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float else type(value) is kind
    return None if ok else f"{key}={_shown.repr(value)} (not of type {kind.__name__})"


def recordable(engine_class: type, spec: LaunchSpec, given_at_wake: Collection[str]) -> dict:
    """The launch arguments `sleep` writes: those the engine's `launch_options` names, less `given_at_wake` (the
    caller passes them to wake). Unsupported, naming each, if the engine was started with an argument the file
    cannot hold (not on that list, or not JSON-able: spec.unrecorded) that is not in `given_at_wake`, since wake
    would start another engine without it; or if a value is not of its declared type (a directory that is gone).
    An argument set to None (the engine's default) is neither refused nor written. ValueError if `given_at_wake`
    names an argument the engine was not started with (a typo)."""
    name = getattr(engine_class, "name", engine_class.__name__)
    options = getattr(engine_class, "launch_options", None) or {}
    unknown = sorted(set(given_at_wake) - spec.kwargs.keys() - spec.unrecorded)
    if unknown:  # a typo ("hf_tokn") would be written, and wake would ask for it, while the real one was lost
        raise ValueError(f"{name}: given_at_wake names {', '.join(map(_shown.repr, unknown))}, which the engine was "
                         f"not started with (its arguments: {', '.join(sorted(spec.kwargs.keys() | spec.unrecorded))})"
                         "; the engine is untouched")
    kwargs = {key: value for key, value in spec.kwargs.items() if value is not None}  # None: the default
    lost = sorted((kwargs.keys() - options.keys() | spec.unrecorded) - set(given_at_wake))
    if lost:
        raise Unsupported(f"{name}: was started with {', '.join(lost)}, which a snapshot file does not hold (the "
                          f"options it may: {', '.join(sorted(options)) or 'none'}), so wake would start a different "
                          f"engine; the engine is untouched. Sleep with given_at_wake={lost!r} and pass them to "
                          "wake in overrides=")
    kept = {key: value for key, value in kwargs.items() if key in options and key not in given_at_wake}
    problems = [problem for key, value in kept.items() if (problem := option_problem(key, value, options))]
    if problems:
        raise Unsupported(f"{name}: cannot record the launch arguments {'; '.join(problems)}; the engine is "
                          "untouched")
    return kept


def start_arguments(recorded: Mapping, overrides: Optional[Mapping], options: Optional[Mapping[str, type]]) -> dict:
    """The file's arguments with the caller's `overrides` over them; RefusedLaunch, naming each, if the file sets
    an option `options` does not allow, or a value not of its type, that the caller does not override (`options`
    None: only values that are not plain are refused, a check that needs no adapter imported)."""
    overrides = dict(overrides or {})
    if not all(isinstance(key, str) for key in overrides):
        raise TypeError(f"overrides maps argument names (str) to values, not {overrides!r}")
    problems = [problem for key, value in recorded.items()
                if key not in overrides and (problem := option_problem(key, value, options))]
    if problems:
        raise RefusedLaunch(f"the snapshot sets {'; '.join(problems)}: an engine is not started with these on a "
                            "file's word; pass them in overrides (your value, or None) if you trust them")
    return {**recorded, **overrides}
