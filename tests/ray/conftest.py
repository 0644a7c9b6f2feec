"""RayForkPool's tests (thaw_ray), once per engine, on a Ray started once for the session (local, 2 CPUs):

    pytest tests/ray --engine template --engine mlx      # the engines this environment has

Engines: the conformance template's toy engine (numpy) and MLX over a tiny zoo model, both quick to start in an
actor. Without --engine every engine is tried. Ray, thaw_ray or an engine that cannot be imported skips its tests
with the reason, and fails them under THAW_REQUIRE_ENGINES=1 (CI).
"""

import dataclasses
import shutil
import tempfile

import pytest

import engine_guard

ENGINES = ("template", "mlx")
WORKERS = 2
OBJECT_STORE_BYTES = 128 << 20  # a round's object is a few MiB at most here


def pytest_addoption(parser):
    parser.addoption("--engine", action="append", dest="engines", choices=ENGINES,
                     help="run the RayForkPool tests on this engine (repeatable; default: every engine)")


def pytest_generate_tests(metafunc):
    if "kind" in metafunc.fixturenames:
        names = metafunc.config.getoption("engines", default=None) or list(ENGINES)
        metafunc.parametrize("kind", list(dict.fromkeys(names)), indirect=True, scope="session")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray of the test session's own: the pool never starts or stops one itself. Its session files go
    to a directory of its own, removed at the end, not /tmp/ray; a short path under /tmp, not pytest's (on macOS
    that one is long enough for Ray's sockets in it to pass AF_UNIX's limit of about 104 bytes)."""
    ray = engine_guard.require("ray", "install the [ray] extra (scripts/setup-core.sh does)")
    engine_guard.require("thaw_ray", "the repository must be on the path (pip install -e .)")
    temp = tempfile.mkdtemp(dir="/tmp", prefix="thawray")
    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False,
                 _temp_dir=temp)
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def kind(request) -> str:
    if request.param == "mlx":
        engine_guard.require("thaw_mlx", "install it with scripts/setup-core.sh")
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
        else:
            from thaw_mlx import MLXEngine

            out = MLXEngine(parent.model, parent.info, checkpoint=parent.checkpoint).generate(prompt, params)
        assert out.cached_tokens == 0
        return out.token_ids
    return generate


@pytest.fixture(scope="session")
def pool(ray_cluster, parent):
    """A RayForkPool of WORKERS actors started from the parent's launch spec."""
    from thaw_ray import RayForkPool

    with RayForkPool(parent, workers=WORKERS) as started:
        yield started
