"""One real vLLM engine for the LangGraph tests, in vLLM's default multiprocessing mode (engine core and
worker in their own processes), over a tiny zoo model with a tokenizer trained here (thaw_conformance.chat_tokenizer)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import engine_guard

HERE = Path(__file__).parent
ENGINE_KWARGS = dict(dtype="float32", block_size=32, enforce_eager=True, skip_tokenizer_init=True,
                     max_model_len=4096, kv_cache_memory_bytes=64 << 20)
PAGE = 32


@pytest.fixture(scope="session")
def model_dir():
    engine_guard.require("vllm", "install it with scripts/setup-vllm.sh")
    engine_guard.require("langgraph", "install the [langgraph] extra (scripts/setup-vllm.sh does)")
    zoo = engine_guard.require("thaw_conformance.zoo", "the repository must be installed (pip install -e .)")
    from thaw_conformance.chat_tokenizer import add_chat_tokenizer

    # Its own root: the tokenizer files are not part of the zoo's recipe.
    model = zoo.make_model("llama", root=zoo.default_root().parent / "zoo-chat")
    return add_chat_tokenizer(model, vocab_size=zoo.model_config("llama")[1]["vocab_size"])


@pytest.fixture(scope="session")
def engine(model_dir):
    """The session's engine: thaw_vllm's contract engine, vLLM in multiprocessing mode."""
    import thaw_vllm

    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default: separate processes
    engine = thaw_vllm.VLLMEngine.start(str(model_dir), **ENGINE_KWARGS)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def chat(engine, model_dir):
    from thaw_langgraph import ChatThaw

    return ChatThaw(engine=engine, tokenizer=model_dir, max_tokens=16)


def run_script(script: str, *args: str, timeout: int = 600) -> str:
    """Run tests/langgraph/<script> in a new process with this interpreter; returns its stdout."""
    proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


@pytest.fixture(scope="session")
def plain(engine, model_dir):
    """A plain vllm.LLM on the same model, prefix caching off and no thaw: the reference every prompt is
    checked against, one prompt at a time. Returns generate(prompt ids, max_tokens) -> output ids."""
    import vllm
    from vllm.inputs import TokensPrompt

    engine = vllm.LLM(str(model_dir), enable_prefix_caching=False, **ENGINE_KWARGS)
    stop = [2, 4]  # </s>, <|im_end|>: what ChatThaw stops at with this tokenizer

    def generate(prompt, max_tokens):
        params = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=stop)
        out = engine.generate([TokensPrompt(prompt_token_ids=list(prompt))], params, use_tqdm=False)[0]
        return list(out.outputs[0].token_ids)

    yield generate
    engine.llm_engine.engine_core.shutdown()
