"""RayForkPool's tests (thaw_ray), once per engine, on a Ray cluster of two nodes on this machine, started once
for the session (a driver joins one cluster per process: every test shares it):

    pytest tests/ray --engine template --engine mlx      # the engines this environment has (.venv)
    pytest tests/ray --engine vllm -k vllm               # vLLM's (.venv-vllm): test_pool.py's VLLM_TESTS
    pytest tests/ray --engine sglang -k sglang           # SGLang's (.venv-sglang): test_pool.py's SGLANG_TESTS

Engines: the conformance template's toy engine (numpy) and MLX over a tiny zoo model, both quick to start in an
actor; vLLM over a tiny zoo model in its default multiprocessing mode (each engine core a process of its own,
as `vllm serve` runs it) and SGLang over one (its scheduler and detokenizer processes of their own), each tens of
seconds per start. Without --engine every engine is tried. Ray, thaw_ray or an
engine that cannot be imported skips its tests with the reason, and fails them under THAW_REQUIRE_ENGINES=1 (CI).
"""

import dataclasses
import os
import shutil
import tempfile
import time
from typing import NamedTuple

import pytest

import engine_guard
from descendants import family, mapped_segments, outliving, unlink_left_behind

# Loopback only: Ray binds its nodes to the network interface's address unless told, when it is imported, that
# this is a single-machine cluster (then every node, the GCS included, takes 127.0.0.1).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# SGLang on CPU, read at its import: set before the cluster's raylets start, so that its actors inherit it
os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

ENGINES = ("template", "mlx", "vllm", "sglang")
WORKERS = 2
OBJECT_STORE_BYTES = 128 << 20  # per node: a round's object is a few MiB at most here
# Custom resources that place an actor on the node its test means: "other" holds the other node's actors;
# "spread", one on the head (the driver's node) and one on each node a test adds, puts one actor there.
HEAD = {"spread": 1}
OTHER = {"other": WORKERS}
# A node lost without a word is marked dead after its health checks fail: in about 7 s here, not Ray's 17 (one
# check a second, three missed in a row; each may take Ray's 10 s to time out, for a node slow under load).
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
# What the pool's README asks of a cluster whose actors' engines start processes of their own (vLLM's engine core):
# the raylet, a subreaper, kills what an actor SIGKILLed leaves behind.
SYSTEM_CONFIG = {**HEALTH_CHECKS, "kill_child_processes_on_worker_exit_with_raylet_subreaper": True}
# vLLM's and SGLang's tests: their engines take tens of seconds to start on two cores, so their runs keep to the
# tests that start no engines beyond the session's pool and one replacement: rounds, a damaged object and an actor
# SIGKILLed (its engine's processes ending with it); the pool's own bookkeeping, nodes and timeouts on the quicker
# engines. A module names each one's tests in VLLM_TESTS and SGLANG_TESTS (test_pool.py's own test checks that each
# name is one of its tests).
SUBSETS = {"vllm": "VLLM_TESTS", "sglang": "SGLANG_TESTS"}
# vLLM's engines: a small explicit KV cache (by default one takes most of the machine's memory)
VLLM_KWARGS = dict(dtype="float32", block_size=32, enforce_eager=True, skip_tokenizer_init=True, max_model_len=1024,
                   kv_cache_memory_bytes=32 << 20)


def pytest_addoption(parser):
    parser.addoption("--engine", action="append", dest="engines", choices=ENGINES,
                     help="run the RayForkPool tests on this engine (repeatable; default: every engine)")


def pytest_generate_tests(metafunc):
    if "kind" in metafunc.fixturenames:
        names = metafunc.config.getoption("engines", default=None) or list(ENGINES)
        test = metafunc.function.__name__
        kinds = [name for name in dict.fromkeys(names)
                 if name not in SUBSETS or test in getattr(metafunc.module, SUBSETS[name], ())]
        metafunc.parametrize("kind", kinds, indirect=True, scope="session")


class Nodes(NamedTuple):
    """The session's Ray cluster: its head (the driver's node) and the other node, by Ray's node ids."""
    cluster: object  # ray.cluster_utils.Cluster: add_node / remove_node for a test's own nodes
    head: str
    other: str

    def add(self, resources: dict, cpus: int = 1):
        """A node of a test's own, with these custom resources and `cpus` CPUs (Ray's placement of an actor needs
        1, whatever else it asks for); `remove` it before the test ends."""
        return self.cluster.add_node(num_cpus=cpus, resources=resources, object_store_memory=OBJECT_STORE_BYTES)

    def remove(self, node, timeout: float = 60) -> None:
        """End a node a test added, if it is still up, and wait until Ray has marked it dead: a node lost without
        a word (its raylet SIGKILLed) is taken for alive, and may be given actors, until its health checks fail."""
        import ray

        if node in self.cluster.worker_nodes:
            self.cluster.remove_node(node)
        deadline = time.monotonic() + timeout
        while any(known["NodeID"] == node.node_id and known["Alive"] for known in ray.nodes()):
            assert time.monotonic() < deadline, f"Ray still takes node {node.node_id} for alive after {timeout} s"
            time.sleep(0.2)


def _end(cluster) -> None:
    """Cluster.shutdown, with each node's removal in its own try: one that raises (Ray's "zombie processes left
    over") would stop it before the head's GCS and raylet. The first error is raised once every node is ended."""
    errors = []
    for node in [*cluster.worker_nodes, cluster.head_node]:
        try:
            if node is not None:
                cluster.remove_node(node)
        except Exception as exc:
            errors.append(exc)
    try:
        cluster.shutdown()  # no nodes left: Ray's record of the cluster's address reset
    finally:
        if errors:
            raise errors[0]


@pytest.fixture(scope="session")
def ray_nodes():
    """A Ray cluster of the test session's own, two nodes on this machine (ray.cluster_utils.Cluster, loopback
    only): the pool never starts or stops one itself. Its session files go to a directory of its own (RAY_TMPDIR,
    where Ray also writes the cluster's address), removed at the end, not /tmp/ray; a short path under /tmp, not
    pytest's (on macOS that one is long enough for Ray's sockets in it to pass AF_UNIX's limit of about 104
    bytes)."""
    ray = engine_guard.require("ray", "install the [ray] extra (scripts/setup-core.sh does)")
    engine_guard.require("thaw_ray", "the repository must be on the path (pip install -e .)")
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(dir="/tmp", prefix="thawray")
    os.mkdir(os.path.join(temp, "ray"))
    before, os.environ["RAY_TMPDIR"] = os.environ.get("RAY_TMPDIR"), temp
    cluster = None
    try:
        cluster = Cluster()
        head = cluster.add_node(num_cpus=2, resources=HEAD, object_store_memory=OBJECT_STORE_BYTES,
                                include_dashboard=False, _system_config=SYSTEM_CONFIG)
        other = cluster.add_node(num_cpus=2, resources=OTHER, object_store_memory=OBJECT_STORE_BYTES)
        ray.init(address=cluster.address, log_to_driver=False)
        yield Nodes(cluster, head.node_id, other.node_id)
    finally:  # each step in its own finally: one that raises (Ray's "zombie processes left over") stops no other
        try:
            ray.shutdown()
        finally:
            try:
                if cluster is not None:
                    _end(cluster)
            finally:
                if before is None:
                    del os.environ["RAY_TMPDIR"]
                else:
                    os.environ["RAY_TMPDIR"] = before
                shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def added_nodes(ray_nodes):
    """(resources, cpus=1) -> a node of the test's own (Nodes.add), each removed at its end and marked dead
    (Nodes.remove), each in its own try, so the cluster is as the other tests know it."""
    added = []
    yield lambda resources, cpus=1: added.append(ray_nodes.add(resources, cpus)) or added[-1]
    errors = []
    for node in added:
        try:
            ray_nodes.remove(node)
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def ray_cluster(ray_nodes):
    """Ray, initialised on the session's cluster."""
    import ray

    return ray


@pytest.fixture(scope="session")
def kind(request) -> str:
    if request.param == "mlx":
        engine_guard.require("thaw_mlx", "install it with scripts/setup-core.sh")
    if request.param == "vllm":
        engine_guard.require("vllm", "install it with scripts/setup-vllm.sh")
    if request.param == "sglang":
        engine_guard.require("thaw_sglang", "install it with scripts/setup-sglang.sh")
    return request.param


def _toy_config() -> dict:
    from thaw_conformance.template.engine import ToyModelConfig

    # fork_pool_checks' token ids run to 1000: a vocabulary that holds them
    return dataclasses.asdict(ToyModelConfig(vocab_size=1024))


@pytest.fixture(scope="session")
def parent(kind):
    """The round's parent: a contract engine of this kind, holding nothing the trunks need."""
    if kind == "template":
        from thaw_conformance.template.adapter import ToyThawEngine

        engine = ToyThawEngine.start(**_toy_config())
    elif kind == "vllm":
        from thaw_conformance import zoo
        from thaw_vllm import VLLMEngine

        engine = VLLMEngine.start(str(zoo.make_model("llama", dtype="float32")), **VLLM_KWARGS)
    elif kind == "sglang":
        from thaw_conformance import zoo
        from thaw_conformance.drivers.sglang import ENGINE_ARGS
        from thaw_sglang import SGLangEngine

        engine = SGLangEngine.start(model_path=str(zoo.make_model("llama")), **ENGINE_ARGS)
    else:
        from thaw_conformance import zoo
        from thaw_mlx import MLXEngine

        engine = MLXEngine.start(str(zoo.make_model("llama")))
    yield engine
    engine.close()


@pytest.fixture
def fresh(kind, parent):
    """(prompt, params) -> the token ids an engine of the parent's model with an empty cache gives."""
    def generate(prompt, params):
        if kind == "template":
            from thaw_conformance.template.adapter import ToyThawEngine

            out = ToyThawEngine.start(**_toy_config()).generate(prompt, params)
        elif kind in ("vllm", "sglang"):  # the parent with nothing cached (a second engine would take its own start)
            assert parent.llm.reset_prefix_cache() if kind == "vllm" else parent.engine.flush_cache().success
            out = parent.generate(prompt, params)
        else:
            from thaw_mlx import MLXEngine

            out = MLXEngine(parent.model, parent.info, checkpoint=parent.checkpoint).generate(prompt, params)
        assert out.cached_tokens == 0
        return out.token_ids
    return generate


@pytest.fixture(scope="session")
def pool(ray_cluster, parent):
    """A RayForkPool of WORKERS actors started from the parent's launch spec."""
    from thaw_ray import RayForkPool, leftovers

    with RayForkPool(parent, workers=WORKERS) as started:
        yield started
        processes = family({info.pid for info in started.worker_info() if info.pid})  # the actors and their engines'
        segments = mapped_segments(processes)
        manifests = [leftovers.manifest_path(info.id) for info in started.worker_info()]
    # ray.kill is asynchronous: a process still ending maps its segments yet, and would hide what it leaves
    assert not outliving(processes, timeout=30), "the pool's close left its actors' or engines' processes running"
    assert not unlink_left_behind(segments), "the pool's close left its engines' shared memory in /dev/shm"
    assert not [path for path in manifests if os.path.exists(path)], "the pool's close left its actors' manifests"
