"""Captured pages are token-major in the spec's sense (section 5.3), checked against an independent computation:
layer 0's K and V of every token, recomputed in plain torch from the checkpoint's safetensors, never read back
through vLLM or thaw's own layout code."""

import json
from pathlib import Path

import pytest
import torch
from conftest import generate, make_engine, trunk_tokens
from safetensors.torch import load_file

from thaw_format.torch import to_torch


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


# vLLM's CPU kernels for the amx block layout and for an fp8 KV cache are built for x86 AVX-512 (or AMX) only:
# on other CPUs vLLM itself refuses them ("Unsupported CPU attention configuration", "FP8 KV cache on CPU requires
# x86 with AVX-512 or AMX"), so there is nothing of thaw's to test there.
needs_avx512 = pytest.mark.skipif(
    not _cpu_flags() & {"avx512f", "amx_tile"},
    reason="vLLM's amx layout writer and fp8 KV cache need an x86 CPU with AVX-512 or AMX; this one has neither",
)
ISAS = ["vec", "vec16", pytest.param("amx", marks=needs_avx512)]


def layer0_kv(model_dir: str, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama layer 0's K (after RoPE) and V of tokens at positions 0..n-1, in float32: [n, kv_heads, head_dim].

    Layer 0's attention input is RMSNorm(embedding) (no residual yet); V has no RoPE; K has rotate-half RoPE.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    w = {k: v.float() for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}
    heads, dim = config["num_key_value_heads"], config["head_dim"]
    theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]

    x = w["model.embed_tokens.weight"][torch.tensor(token_ids)]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"])
    x = x * w["model.layers.0.input_layernorm.weight"]
    k = (x @ w["model.layers.0.self_attn.k_proj.weight"].T).view(len(token_ids), heads, dim)
    v = (x @ w["model.layers.0.self_attn.v_proj.weight"].T).view(len(token_ids), heads, dim)

    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(len(token_ids), dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1).float()[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1).float()[:, None, :]
    rotated = torch.cat([-k[..., dim // 2 :], k[..., : dim // 2]], -1)
    return k * cos + rotated * sin, v


def test_pages_hold_each_tokens_kv_at_its_position(engine, vllm):
    """A running request of 84 computed tokens: pages of 32, 32 and a partial 20 (prefill and decode writes)."""
    import thaw_vllm
    from vllm.inputs import TokensPrompt

    prompt = trunk_tokens(80, seed=40)
    core = engine.llm_engine
    core.add_request("layout", TokensPrompt(prompt_token_ids=prompt),
                     vllm.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    for _ in range(5):  # one prefill step, four decode steps
        core.step()
    snapshot = thaw_vllm.capture(engine, include_weights=False, chains=[prompt])
    while core.has_unfinished_requests():
        core.step()

    assert snapshot.engine.native_kv_layout.startswith("CPU_ATTN isa=")
    (request,) = snapshot.scheduler.requests
    assert request.num_computed_tokens == 84
    tree = snapshot.prefix
    assert [len(tree.tokens[p]) for p in request.pages] == [32, 32, 20]
    tokens = [t for p in request.pages for t in tree.tokens[p]]
    assert tokens == (request.prompt_token_ids + request.output_token_ids)[:84]

    want_k, want_v = layer0_kv(engine.thaw_model, tokens)
    layer = snapshot.kv.layers[0]
    pages = torch.tensor(request.pages)
    got = {role: to_torch(layer.tensors[role])[pages].float().flatten(0, 1)[:84] for role in ("k", "v")}
    # float32: the engine's arithmetic differs from this one only in rounding; bfloat16: in bfloat16 rounding
    tol = dict(rtol=1e-4, atol=1e-4) if snapshot.kv.dtype == "float32" else dict(rtol=2e-2, atol=3e-2)
    for role, want in (("k", want_k), ("v", want_v)):
        for position in range(84):
            assert torch.allclose(got[role][position], want[position], **tol), (
                f"{role} of token {position}: max error {(got[role][position] - want[position]).abs().max():.3g}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_layout_is_the_one_vllms_writer_uses(vllm, isa, dtype):
    """For every ISA vLLM's CPU attention can pick (amx is only picked on AMX hardware, but its writer runs
    anywhere), the probed layout reads back exactly what the writer stored, partial blocks included, and
    writes blocks byte-identical to the writer's."""
    from thaw_vllm import _internals, pages

    block_size, heads, head_dim = 32, 2, 64
    native = pages.native_layout(isa, dtype, block_size, heads, head_dim)
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2 * block_size - 5, heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    cache = torch.zeros(4, heads, block_size, 2 * head_dim, dtype=dtype)
    _internals.cpu_attn_write(cache, k, v, torch.arange(block_size, 3 * block_size - 5), isa)  # blocks 1, 2

    got_k, got_v = pages.blocks_to_pages(cache, [1, 2], native)
    assert got_k.flatten(0, 1)[: len(k)].view(torch.uint8).equal(k.view(torch.uint8))
    assert got_v.flatten(0, 1)[: len(v)].view(torch.uint8).equal(v.view(torch.uint8))
    as_bytes = [t.view(torch.uint8).numpy() for t in (got_k, got_v)]
    assert pages.pages_to_blocks(*as_bytes, native, dtype).view(torch.uint8).equal(cache[1:3].view(torch.uint8))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_pages", [0, 2])
def test_libthaw_pages_equal_the_torch_index_path(vllm, isa, dtype, chunk_pages):
    """The fused path (libthaw through the probed positions, checksums in the same pass) gives byte for byte
    the pages and blocks of the previous torch path (index_select / index_copy_ over the same positions), with
    chunks of 4 KiB or of two whole pages (where float32 K moves in 16 x 16 tiles summed in the registers, on a
    CPU with AVX-512)."""
    from thaw_format import mover
    from thaw_vllm import pages

    block_size, heads, head_dim = 32, 4, 64
    native = pages.native_layout(isa, dtype, block_size, heads, head_dim)
    cache = torch.randn(12, heads, block_size, 2 * head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    ids = [7, 0, 11, 3, 4]
    flat = cache.view(cache.shape[0], -1)[torch.tensor(ids)]
    shape = (len(ids), *native.page_shape)
    torch_k = flat.index_select(1, native.k_positions).view(shape)
    torch_v = flat.index_select(1, native.v_positions).view(shape)

    k = torch.empty(shape, dtype=dtype)
    chunk = chunk_pages * native.pages["k"].page_bytes or 4096
    crcs = pages.gather_role(cache, ids, native, "k", k.view(torch.uint8).numpy(), chunk)
    assert k.view(torch.uint8).equal(torch_k.view(torch.uint8))
    assert crcs == mover.chunk_crcs(k.view(torch.uint8).numpy(), chunk)
    _, v = pages.blocks_to_pages(cache, ids, native)
    assert v.view(torch.uint8).equal(torch_v.view(torch.uint8))

    torch_blocks = k.new_empty(len(ids), 2 * native.k_positions.numel())
    torch_blocks.index_copy_(1, native.k_positions, torch_k.reshape(len(ids), -1))
    torch_blocks.index_copy_(1, native.v_positions, torch_v.reshape(len(ids), -1))
    target = torch.zeros_like(cache)
    pages.scatter_pages(target, ids, *(t.view(torch.uint8).numpy() for t in (torch_k, torch_v)), native)
    assert target[ids].view(torch.uint8).equal(torch_blocks.view(len(ids), *native.block_shape).view(torch.uint8))
    untouched = [i for i in range(12) if i not in ids]
    assert not target[untouched].view(torch.uint8).any()


@needs_avx512
def test_an_unmapped_layout_is_refused_before_anything_is_touched(vllm, zoo, greedy):
    """An fp8 KV cache is not a permutation of K and V: capture says so, and restore refuses a snapshot."""
    import thaw_format
    import thaw_vllm

    source, fp8 = make_engine(zoo, "llama", "float32"), make_engine(zoo, "llama", "float32", kv_cache_dtype="fp8")
    trunk = trunk_tokens(70, seed=41)
    generate(source, trunk, greedy)
    snapshot = thaw_vllm.capture(source, include_weights=False, chains=[trunk])
    reference = generate(fp8, trunk, greedy)
    with pytest.raises(NotImplementedError, match="kv_cache_dtype='fp8'"):
        thaw_vllm.capture(fp8, include_weights=False)
    with pytest.raises(thaw_format.IncompatibleSnapshotError, match="engine.native_kv_layout"):
        thaw_vllm.restore(fp8, snapshot)
    assert generate(fp8, trunk, greedy) == (reference[0], 64)  # still serving from its own cache
