"""The adapter SDK: the one contract every engine adapter implements (`contract`), and what is written once on
top of it for every engine. Nothing here imports an engine; thaw_format's core modules import nothing from here.
"""

from .contract import (
    CAPABILITIES,
    CAPABILITY_METHODS,
    CORE_METHODS,
    DEFAULT_PAGE_SIZE,
    Engine,
    Finished,
    Generation,
    LaunchSpec,
    Progress,
    Refused,
    Resumed,
    Unsupported,
    adapter_problems,
    greedy,
    lineage_now,
    pending_requests,
    require,
    seeded,
)
from ..errors import UnknownWeightsError
from .fork import fork, generate_all
from .launch import LocalDirectory, OneOf, RefusedLaunch
from .pool import ForkPool, ForkRound, PoolWorkerDied, PoolWorkerStarting, WorkerInfo
from .sleep import Awake, SleptNotClosed, sleep, wake

__all__ = [
    "Awake", "CAPABILITIES", "CAPABILITY_METHODS", "CORE_METHODS", "DEFAULT_PAGE_SIZE", "Engine", "Finished",
    "ForkPool", "ForkRound", "Generation", "LaunchSpec", "LocalDirectory", "OneOf", "PoolWorkerDied",
    "PoolWorkerStarting", "Progress", "Refused", "RefusedLaunch", "Resumed", "SleptNotClosed", "UnknownWeightsError",
    "Unsupported", "WorkerInfo", "adapter_problems", "fork", "generate_all", "greedy", "lineage_now",
    "pending_requests", "require", "seeded", "sleep", "wake",
]
