"""Engine factories for fork-pool and process-fork tests, on the template's toy engine (numpy, quick to start):
workers import this module by name (a launch spec's factory), so a test gives them this directory on their
PYTHONPATH (`worker_env`)."""

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from thaw_conformance.template.adapter import ToyThawEngine
from thaw_format.sdk import LaunchSpec

HERE = Path(__file__).resolve().parent


def worker_env() -> dict:
    """What a worker's environment needs beyond this process's: this directory, to import this module from."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}


def flaky(instructions: str, **config) -> ToyThawEngine:
    """A toy engine of `config`, unless an instruction is queued in the directory `instructions`: each start
    claims the lowest-numbered file there (renamed away, so no two starts take the same one) and fails as its
    text says, "error" (the engine raises), "exit" (the process ends at once, without a word) or "hang" (the
    start never ends, no process of its own left behind when it is killed: for RayForkPool only, which gives a
    placed actor's start up; ForkPool waits for its engine however long it takes); or "held": it starts once a file
    named "release" is in the directory (its claimed file the sign that it has begun: a test acts meanwhile, for
    as long as it needs, under load too). A test queues
    every instruction (`queue_starts`) before the starts that take them: a start racing a rewritten file could
    read the old instruction."""
    for name in sorted(filter(str.isdigit, os.listdir(instructions)), key=int):
        claimed = os.path.join(instructions, f"claimed-{name}")
        try:
            os.rename(os.path.join(instructions, name), claimed)
        except FileNotFoundError:  # another start claimed it first
            continue
        with open(claimed) as told:
            how = told.read()
        if how == "exit":
            os._exit(3)
        if how == "hang":
            time.sleep(3600)
        if how == "held":
            while not os.path.exists(os.path.join(instructions, "release")):
                time.sleep(0.05)
            return ToyThawEngine.start(**config)
        raise RuntimeError(f"told to fail by {claimed}")
    return ToyThawEngine.start(**config)


def queue_starts(instructions: Path, *hows: str) -> None:
    """Queue instructions for the next flaky starts, in order: "error", "exit", "hang" or "held" each."""
    for number, how in enumerate(hows, start=len(os.listdir(instructions))):
        (instructions / str(number)).write_text(how)


class ToyWithAProcess(ToyThawEngine):
    """The toy engine with a process of its own that, like vLLM's engine core, never checks whether its parent
    is alive: it lives on if this engine's process dies without closing it."""

    @classmethod
    def start(cls, **config) -> "ToyWithAProcess":
        engine = super().start(**config)
        engine.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        return engine

    def launch_spec(self) -> LaunchSpec:
        return LaunchSpec(f"{__name__}:ToyWithAProcess.start", super().launch_spec().kwargs)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        super().close()


# A process that makes a segment of shared memory, says its name, and holds it mapped: out of its resource tracker,
# as vLLM's engine core's are in effect in a Ray actor (the raylet kills the tracker with the actor); it maps the
# segments named in its arguments too, made by others before it
HOLDING = """
from multiprocessing import resource_tracker, shared_memory
import sys, time
segment = shared_memory.SharedMemory(create=True, size=1 << 20)
resource_tracker.unregister(segment._name, "shared_memory")
others = [shared_memory.SharedMemory(name=name) for name in sys.argv[1:]]
for other in others:  # attached, not made: its maker's to unlink
    resource_tracker.unregister(other._name, "shared_memory")
print(segment.name, flush=True)
time.sleep(3600)
"""


class ToyHoldingMemory(ToyThawEngine):
    """The toy engine whose process of its own holds shared memory it made, as vLLM's engine core does, and maps the
    segments `attach` names: its close ends the process and unlinks its own segment; a process killed without it
    leaves the segment in /dev/shm."""

    @classmethod
    def start(cls, attach=(), **config) -> "ToyHoldingMemory":
        engine = super().start(**config)
        engine.attach = list(attach)
        engine.process = subprocess.Popen([sys.executable, "-c", HOLDING, *attach], stdout=subprocess.PIPE, text=True)
        engine.segment = engine.process.stdout.readline().strip()
        return engine

    def launch_spec(self) -> LaunchSpec:
        return LaunchSpec(f"{__name__}:ToyHoldingMemory.start", {**super().launch_spec().kwargs, "attach": self.attach})

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        os.unlink(f"/dev/shm/{self.segment}")
        super().close()


def holding_then_hanging(said: str, **config) -> ToyHoldingMemory:
    """A ToyHoldingMemory whose start never ends once its process holds its segment, like an engine whose start
    hangs after its engine core has made its shared memory; the segment's name written to the file `said`."""
    engine = ToyHoldingMemory.start(**config)
    Path(said).write_text(engine.segment)
    time.sleep(3600)
    return engine


class ToyDyingInRounds(ToyThawEngine):
    """The toy engine, whose process ends at once (status 4, like a crash) in each round while the file `marker`
    exists, and otherwise appends its pid (a line) to the file `log`, if given, in each round it runs."""

    @classmethod
    def start(cls, marker: str, log: Optional[str] = None, **config) -> "ToyDyingInRounds":
        engine = super().start(**config)
        engine.marker, engine.log = marker, log
        return engine

    def generate(self, prompt, params):
        if os.path.exists(self.marker):
            os._exit(4)
        if self.log is not None:
            with open(self.log, "a") as log:
                log.write(f"{os.getpid()}\n")
        return super().generate(prompt, params)


def loading_for_ever(**config) -> ToyWithAProcess:
    """A ToyWithAProcess whose start never ends, like a large model's load: a worker that does not read its
    input until its engine has started."""
    ToyWithAProcess.start(**config)
    time.sleep(3600)
