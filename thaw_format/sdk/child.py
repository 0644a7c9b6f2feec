"""A fork child: `python -m thaw_format.sdk.child '<json config>'`, started by thaw_format.sdk.fork.

The config names an engine factory ("module:attribute"), its JSON arguments, and the source of a snapshot
(thaw_format.sdk.shared: shared memory, or a file). The child starts the engine, restores the snapshot, answers {"ready": true}, then serves one JSON line per request
({"prompt": [...], "params": {SamplingParams fields}}) with {"generation": {...}} or {"error": "..."}. The
engine's own printing goes to stderr, off the protocol stream. End of input closes the engine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from ..snapshot import SamplingParams
from .engine_process import lead_own_group
from .factories import resolve
from .shared import restore_source


def serve(engine, lines, reply) -> None:
    for line in lines:
        message = json.loads(line)
        try:
            generation = engine.generate(message["prompt"], SamplingParams(**message["params"]))
            reply({"generation": dataclasses.asdict(generation)})
        except Exception as exc:  # reported to the parent, which raises it
            reply({"error": f"{type(exc).__name__}: {exc}"})


def protocol_replies():
    """The function that writes one JSON line to the real stdout; everything else printed goes to stderr."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return lambda message: protocol.write(json.dumps(message) + "\n")


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    reply = protocol_replies()
    try:  # a failure here is reported too
        lead_own_group(config["parent"])  # the processes its engine starts end with it (thaw_format.sdk.engine_process)
        engine = resolve(config["factory"])(**config["kwargs"])
        restore_source(engine, config["source"])
    except Exception as exc:
        reply({"error": f"starting the child engine: {type(exc).__name__}: {exc}"})
        return 1
    try:  # its engine is closed whatever happens from here: a parent gone meanwhile fails the first reply
        reply({"ready": True})
        serve(engine, sys.stdin, reply)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
