"""vLLM general plugin (entry point `vllm.general_plugins: thaw`), loaded by vLLM in each of its processes:
registers load_format="thaw" and thaw's engine-core operation."""


def register() -> None:
    from vllm.model_executor.model_loader import register_model_loader

    from . import _internals
    from .core_ops import thaw_call
    from .loader import ThawModelLoader

    register_model_loader("thaw")(ThawModelLoader)
    _internals.install_engine_core_method("thaw_call", thaw_call)
