"""sleep / wake on vLLM (the test of tests/sleep_checks.py), across processes: a VLLMEngine in a new process
(sleep_helper.py) sleeps with two requests in flight and exits; this process wakes an engine from the file alone
and finishes them exactly. The woken engine is in this process, in-process vLLM: it stays alive to the end of
the session, as conftest's engines do (vLLM's shutdown of one in-process engine tears down state the others use)."""

from conftest import ENGINE_KWARGS, make_engine, run_helper

from sleep_checks import check_capture_holds_still, check_woken
from thaw_format.sdk import wake

_WOKEN = []  # kept alive to the end of the session


def test_an_engine_slept_in_another_process_wakes_here_and_finishes_exactly(vllm, zoo, tmp_path):
    path = tmp_path / "slept.thaw"
    slept = run_helper("sleep_helper.py", {"model": str(zoo.make_model("llama", dtype="float32")),
                                           "engine_kwargs": {**ENGINE_KWARGS, "dtype": "float32"}, "path": str(path),
                                           "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}})
    assert slept["closed"]
    awake = wake(path)
    _WOKEN.append(awake.engine)
    check_woken(awake, slept["want"])


def test_a_capture_does_not_change_as_the_engine_goes_on(vllm, zoo):
    """On the session's in-process engine (its requests' lists live in this process)."""
    from thaw_vllm import VLLMEngine

    check_capture_holds_still(VLLMEngine(make_engine(zoo, "llama", "float32")))


def test_every_option_a_file_may_set_is_an_engine_argument(vllm):
    """VLLMEngine.launch_options names vLLM's own EngineArgs fields (start passes them to vllm.LLM): no drift; the
    load formats a file may set are vLLM's own loader of the model directory, no revision (the model is a directory)."""
    import dataclasses

    from thaw_vllm import VLLMEngine
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER as loaders
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    assert VLLMEngine.launch_options.keys() <= {f.name for f in dataclasses.fields(EngineArgs)}
    assert not VLLMEngine.launch_options.keys() & {"revision", "tokenizer_revision", "code_revision"}
    assert {loaders[name] for name in VLLMEngine.launch_options["load_format"].values} == {DefaultModelLoader}


def test_an_engine_started_with_an_argument_that_is_not_json_refuses_to_sleep(vllm):
    """engine_args names the arguments its launch spec cannot hold, and sleep refuses them (they were dropped)."""
    import types

    import pytest
    from thaw_vllm import VLLMEngine, api
    from vllm.config import CompilationConfig

    from thaw_format.sdk import LaunchSpec, Unsupported
    from thaw_format.sdk.launch import recordable

    kwargs = api.engine_args(dtype="float32", compilation_config=CompilationConfig())
    config = types.SimpleNamespace(model_config=types.SimpleNamespace(model="/models/llama"),
                                   kv_transfer_config=kwargs["kv_transfer_config"])
    model, plain, unplain = api.launch_arguments(types.SimpleNamespace(llm_engine=types.SimpleNamespace(
        vllm_config=config)))
    assert "compilation_config" not in plain and unplain == {"compilation_config"}
    spec = LaunchSpec("thaw_vllm.engine:VLLMEngine.start", {"model": model, **plain}, unplain)
    with pytest.raises(Unsupported, match="started with compilation_config, which a snapshot file does not hold"):
        recordable(VLLMEngine, spec, [])
    assert recordable(VLLMEngine, spec, ["compilation_config", "model"]) == {"dtype": "float32",
                                                                            "enable_prefix_caching": True}
