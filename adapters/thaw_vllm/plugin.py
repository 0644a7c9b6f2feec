"""vLLM general plugin (entry point `vllm.general_plugins: thaw`): registers load_format="thaw"."""


def register() -> None:
    from vllm.model_executor.model_loader import register_model_loader

    from .loader import ThawModelLoader

    register_model_loader("thaw")(ThawModelLoader)
