"""The zoo's numpy-only checkpoints are the checkpoints transformers itself makes and saves.

For every architecture: config.json is the file transformers writes for the zoo's chosen fields (less its
version line), so every default an engine reads is transformers' own; loading the checkpoint with transformers and saving it again with
torch gives back the identical safetensors bytes (so names, shapes, dtypes and the file layout are exactly
what save_pretrained writes: a missing, extra or misshapen tensor changes them); the tensors transformers
initialises to a constant (norms, biases) hold that constant; and torch's own float32 -> bfloat16 rounding of
the float32 checkpoint is the zoo's bfloat16 checkpoint, byte for byte.
"""

import json

import pytest

from thaw_conformance import zoo
from thaw_conformance.models import ARCHS

torch = pytest.importorskip("torch", reason="the transformers reference needs torch (.venv has it)")
transformers = pytest.importorskip("transformers", reason="the reference is transformers itself (.venv has it)")
from safetensors.torch import load_file  # noqa: E402

TINY = [(arch, ARCHS[arch]) for arch in ARCHS]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.mark.parametrize("arch,overrides", TINY, ids=[a for a, _ in TINY])
def test_config_is_what_transformers_writes(root, arch, overrides, tmp_path):
    path = zoo.make_model(arch, root, **overrides)
    model_type, fields = zoo.model_config(arch, **overrides)
    # the fields the zoo chose; transformers supplies its defaults and what it derives itself
    defaults = {**zoo._WRITTEN_DEFAULTS, **zoo._DEFAULTS[model_type]}
    derived = ("model_type", "layer_types", "qk_head_dim") + (("head_dim",) if model_type == "deepseek_v2" else ())
    chosen = {k: v for k, v in fields.items() if k not in derived and (k not in defaults or defaults[k] != v)}
    reference = transformers.AutoConfig.for_model(model_type, **chosen)
    reference.architectures = json.loads((path / "config.json").read_text())["architectures"]
    reference.dtype = "float32"
    reference.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    written.pop("transformers_version")
    assert json.loads((path / "config.json").read_text()) == written


@pytest.mark.parametrize("arch,overrides", TINY, ids=[a for a, _ in TINY])
def test_weights_are_what_transformers_saves(root, arch, overrides, tmp_path):
    path = zoo.make_model(arch, root, **overrides)
    model, loading = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched tensor
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()

    ours = load_file(path / "model.safetensors")
    torch.manual_seed(0)
    fresh = transformers.AutoModelForCausalLM.from_config(model.config).state_dict()
    constant = {name: t for name, t in fresh.items() if t.numel() > 1 and bool((t == t.flatten()[0]).all())}
    assert constant  # every architecture has norms
    for name, t in constant.items():
        assert torch.equal(ours[name], t), name


def test_bfloat16_is_torch_rounding(root):
    f32 = load_file(zoo.make_model("qwen3_moe", root) / "model.safetensors")
    bf16 = load_file(zoo.make_model("qwen3_moe", root, dtype="bfloat16") / "model.safetensors")
    assert f32.keys() == bf16.keys()
    for name, t in f32.items():
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(t.to(torch.bfloat16).view(torch.int16), bf16[name].view(torch.int16)), name


def test_weights_are_seeded():
    """The same arguments give the same bytes; another seed gives other values with the recipe's spread."""
    from thaw_conformance import seeded_weights

    first = seeded_weights.uniform("w", 0, 100_000, 0.1)
    assert first.tobytes() == seeded_weights.uniform("w", 0, 100_000, 0.1).tobytes()
    other = seeded_weights.uniform("w", 1, 100_000, 0.1)
    assert (first != other).mean() > 0.99
    assert abs(float(first.std()) - 0.1) < 1e-3 and abs(float(first.mean())) < 1e-3


def test_benchmark_layout_is_what_transformers_builds():
    """The 494M-parameter benchmark model, without building it: transformers' tensors on the meta device."""
    from thaw_conformance.checkpoint_layout import layout

    model_type, fields = zoo.model_config("qwen2.5-0.5b")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**fields))
    built = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    built.pop("lm_head.weight")  # tied to the embeddings: save_pretrained leaves it out
    assert {t.name: t.shape for t in layout(model_type, fields)} == built
