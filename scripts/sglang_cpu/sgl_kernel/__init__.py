"""Stand-in for SGLang's kernel package, which has no CPU build on PyPI (test environment only).

SGLang imports a few names from `sgl_kernel` at import time even on CPU, where (without AMX) every layer
then takes its torch-native path. Exactly those names exist here, each an op that raises when called, so
nothing is ever silently faked: if SGLang does call one, the run fails naming the op. Any other name or
submodule is absent (ImportError), which is what SGLang's own fallbacks expect from a missing kernel.
"""

__version__ = "0.0.0+thaw.cpu.standin"

# The names SGLang 0.5.23 imports unconditionally on a CPU-only start.
_IMPORTED_AT_START = (
    "copy_all_layer_kv_cache_cpu",
    "assign_req_to_token_pool_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
)


class StandInOpCalled(NotImplementedError):
    """SGLang called a kernel that the CPU stand-in does not provide."""


def _op(name: str):
    def op(*args, **kwargs):
        raise StandInOpCalled(
            f"sgl_kernel.{name} was called, but this environment has only the CPU stand-in installed by "
            "scripts/setup-sglang.sh; the caller expected a real kernel"
        )

    op.__name__ = op.__qualname__ = name
    return op


globals().update({name: _op(name) for name in _IMPORTED_AT_START})
