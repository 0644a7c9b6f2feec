"""`thaw convert`: mlx-lm prompt-cache files <-> snapshots, through the CLI, both ways and back again."""

import json
import os

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

import thaw_format
import thaw_mlx
from thaw_mlx.prompt_cache_file import export_prompt_cache
from thaw_format.cli import main  # the `thaw` command, which finds `convert` through its entry point
from hostile import craft
from sessions import CASES
from zoo import CONFIGS
import sync_counts

MORE_TOKENS = 12


def continuation(model, cache, tokens):
    return list(thaw_mlx.generate(model, cache, tokens, MORE_TOKENS))


@pytest.mark.parametrize("name", ["llama-kv", "llama-rotating", "llama-quantized"])
def test_snapshot_to_mlx_lm_file_and_back(name, session, saved, tmp_path):
    model, cache, tokens = session(name)
    path = saved(thaw_mlx.capture(model, cache, tokens, num_prompt_tokens=30))
    original = thaw_format.load(path)
    expected = continuation(model, cache, tokens)

    exported = tmp_path / "cache.safetensors"
    assert main(["convert", path, str(exported)]) == 0
    loaded, metadata = load_prompt_cache(str(exported), return_metadata=True)
    assert [type(c) for c in loaded] == [type(c) for c in cache] and json.loads(metadata["thaw_tokens"]) == tokens
    assert continuation(model, loaded, tokens) == expected

    back = tmp_path / "back.thaw"
    assert main(["convert", str(exported), str(back)]) == 0
    again = thaw_format.load(str(back))
    assert again.model == original.model and again.prefix == original.prefix
    assert again.scheduler == original.scheduler
    assert [layer.tensors for layer in again.kv.layers] == [layer.tensors for layer in original.kv.layers]
    assert continuation(model, thaw_mlx.restore(model, again), tokens) == expected


def test_snapshot_of_an_idle_prefix_cache_exports(session, saved, tmp_path):
    """A snapshot with no requests, only a prefix cache's one chain (as vLLM, SGLang and transformers write when
    idle), exports with that chain as the file's tokens, rather than failing on its missing request."""
    model, cache, tokens = session("llama-kv")
    snapshot = thaw_mlx.capture(model, cache, tokens)
    snapshot.scheduler.requests = []
    chain = snapshot.prefix.chain_tokens(snapshot.prefix.leaves()[0])
    exported = tmp_path / "cache.safetensors"
    assert main(["convert", saved(snapshot), str(exported)]) == 0
    _, metadata = load_prompt_cache(str(exported), return_metadata=True)
    assert json.loads(metadata["thaw_tokens"]) == chain and metadata["thaw_num_prompt_tokens"] == str(len(chain))


@pytest.mark.parametrize("name", ["a" * 243 + ".safetensors", "é" * 121 + ".safetensors"])  # 255 and 254 bytes
def test_export_to_a_name_of_the_longest_length(name, session, tmp_path):
    """The export's temporary added 21 bytes to the name (File name too long, for a name open() takes): it is
    now the writer's, cut to fit."""
    model, cache, tokens = session("llama-kv")
    export_prompt_cache(thaw_mlx.capture(model, cache, tokens, num_prompt_tokens=30), tmp_path / name)
    _, metadata = load_prompt_cache(str(tmp_path / name), return_metadata=True)
    assert json.loads(metadata["thaw_tokens"]) == tokens and os.listdir(tmp_path) == [name]


def test_mlx_lm_file_to_snapshot_needs_model_and_tokens(model_of, tmp_path, capsys):
    """A file written by mlx-lm itself (its generate_step, one token ahead) converts given config and tokens."""
    model = model_of("llama-kv")
    assert thaw_mlx.model_config(model) == thaw_mlx.identity.checkpoint_config(CONFIGS["llama"])
    prompt = list(range(3, 90, 2))
    cache = [type(c)() for c in model.make_cache()]
    steps = generate_step(mx.array(prompt), model, prompt_cache=cache, max_tokens=MORE_TOKENS + 6)
    produced = [token for token, _ in steps]
    cache = model.make_cache()
    steps = generate_step(mx.array(prompt), model, prompt_cache=cache, max_tokens=6)
    tokens = prompt + [token for token, _ in steps]
    mlx_file = tmp_path / "prompt.safetensors"
    save_prompt_cache(str(mlx_file), cache, {"model": "tiny-llama"})

    snap = tmp_path / "imported.thaw"
    assert main(["convert", str(mlx_file), str(snap)]) == 1
    assert "does not record its token ids" in (err := capsys.readouterr().err) and "--tokens" in err
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    assert main(["convert", str(mlx_file), str(snap), "--tokens", str(tmp_path / "tokens.json")]) == 1
    assert "does not say which model" in (err := capsys.readouterr().err) and "--model DIR" in err

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(CONFIGS["llama"]))
    (tmp_path / "short.json").write_text(json.dumps(tokens[:5]))  # token ids that are not the cache's: no traceback
    assert main(["convert", str(mlx_file), str(snap), "--tokens", str(tmp_path / "short.json"),
                 "--model", str(tmp_path / "model")]) == 1
    assert "tokens, but 5 token ids were given" in capsys.readouterr().err
    assert not snap.exists()
    assert main(["convert", str(mlx_file), str(snap), "--tokens", str(tmp_path / "tokens.json"),
                 "--model", str(tmp_path / "model")]) == 0
    snapshot = thaw_format.load(str(snap))
    assert snapshot.model.weights_digest is None and snapshot.model.dtype == "float32"
    restored = thaw_mlx.restore(model, snapshot)
    assert tokens[len(prompt):] + list(thaw_mlx.generate(model, restored, tokens, MORE_TOKENS)) == produced


def test_import_refuses_another_model(model_of, session, saved, tmp_path):
    model, cache, tokens = session("llama-kv")
    exported = tmp_path / "cache.safetensors"
    assert main(["convert", saved(thaw_mlx.capture(model, cache, tokens)), str(exported)]) == 0
    assert main(["convert", str(exported), str(tmp_path / "back.thaw")]) == 0
    with pytest.raises(thaw_format.IncompatibleSnapshotError, match="model.architecture"):
        thaw_mlx.restore(model_of("qwen2-kv"), thaw_format.load(str(tmp_path / "back.thaw")))


def _with_layer_param(path: str, layer: int, name: str, value) -> str:
    """The saved snapshot at path, rewritten with one KV layer parameter the writer itself would refuse."""
    def edit(document, payloads):
        document["kv"]["layers"][layer]["params"][name] = value

    with open(path, "rb") as f:
        data = craft.rebuild(f.read(), edit)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_export_checks_the_snapshot_first(session, saved, tmp_path, capsys):
    model, cache, tokens = session("llama-rotating")
    path = _with_layer_param(saved(thaw_mlx.capture(model, cache, tokens)), 1, "keep", 99)
    assert main(["convert", path, str(tmp_path / "cache.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "kv.layers[1]" in err and "keep" in err
    assert not list(tmp_path.glob("*.safetensors"))


def test_import_with_a_checkpoint_takes_the_checkpoints_identity(session, tmp_path):
    model, cache, tokens = session("llama-kv")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(dict(CONFIGS["llama"], architectures=["LlamaForCausalLM"])))
    model.save_weights(str(checkpoint / "model.safetensors"))
    exported = tmp_path / "cache.safetensors"
    save_prompt_cache(str(exported), cache, {})
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    assert main(["convert", str(exported), str(tmp_path / "imported.thaw"), "--tokens", str(tmp_path / "tokens.json"),
                 "--model", str(checkpoint)]) == 0
    snapshot = thaw_format.load(str(tmp_path / "imported.thaw"))
    info = thaw_mlx.model_info(model, checkpoint=checkpoint)
    assert snapshot.model == info and info.architecture == "LlamaForCausalLM" and info.weights_digest
    restored = thaw_mlx.restore(model, snapshot, info=info)
    assert thaw_mlx.num_cached_tokens(restored) == thaw_mlx.num_cached_tokens(cache)


def test_convert_refuses_what_it_cannot_convert_without_a_traceback(session, saved, tmp_path, capsys):
    """Random bytes as source, a ring window no MLX cache can hold, a destination folder that is missing."""
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(range(256)) * 20)
    assert main(["convert", str(noise), str(tmp_path / "out.thaw")]) == 1
    assert "is neither a thaw snapshot" in capsys.readouterr().err
    weights = tmp_path / "weights.safetensors"  # safetensors, but not a prompt cache
    mx.save_safetensors(str(weights), {"w": mx.zeros(2)})
    assert main(["convert", str(weights), str(tmp_path / "out.thaw")]) == 1
    assert "is not an mlx-lm prompt-cache file" in capsys.readouterr().err

    model, cache, tokens = session("llama-rotating")
    path = _with_layer_param(saved(thaw_mlx.capture(model, cache, tokens)), 1, "window", 2**70)
    assert main(["convert", path, str(tmp_path / "cache.safetensors")]) == 1
    assert "kv.layers[1]" in capsys.readouterr().err

    good = saved(thaw_mlx.capture(model, *session("llama-rotating")[1:]), "good.thaw")
    for src in (good, str(noise)):
        assert main(["convert", src, str(tmp_path / "missing" / "out")]) == 2
        assert "the destination's folder does not exist" in capsys.readouterr().err
    for folder in (str(tmp_path), ".", ""):  # export: a rename error after the whole write; "." and "": a traceback
        assert main(["convert", good, folder]) == 2
        assert "the destination is a folder" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.safetensors*")) or list(tmp_path.glob("*.safetensors")) == [weights]


def test_import_with_no_durable_skips_the_fsyncs(session, saved, tmp_path, monkeypatch):
    model, cache, tokens = session("llama-kv")
    exported = tmp_path / "cache.safetensors"
    assert main(["convert", saved(thaw_mlx.capture(model, cache, tokens)), str(exported)]) == 0
    syncs = sync_counts.count(monkeypatch)
    assert main(["convert", str(exported), str(tmp_path / "back.thaw"), "--no-durable"]) == 0
    assert syncs == {"fsync": 0, "writeback": 0} and thaw_mlx.snapshot_tokens(thaw_format.load(tmp_path / "back.thaw")) == tokens


@pytest.mark.parametrize("option, name, text, match", [
    ("--tokens", "tokens.json", "[1, 2", "is not JSON"),  # was a JSONDecodeError traceback
    ("--tokens", "tokens.json", '{"a": 1}', "JSON list of token ids"),  # was "invalid literal for int()"
    ("--tokens", "tokens.json", "[1, -2, true]", "JSON list of token ids"),
    ("--model", "config.json", "{", "is not JSON"),  # was a JSONDecodeError traceback
    ("--model", "config.json", "[]", "not a JSON object"),
])
def test_import_refuses_a_malformed_tokens_or_config_file_as_an_argument_error(session, saved, tmp_path, capsys,
                                                                                option, name, text, match):
    model, cache, tokens = session("llama-kv")
    exported = tmp_path / "cache.safetensors"
    assert main(["convert", saved(thaw_mlx.capture(model, cache, tokens)), str(exported)]) == 0
    capsys.readouterr()
    (tmp_path / "arg").mkdir()
    (tmp_path / "arg" / name).write_text(text)
    value = tmp_path / "arg" / name if option == "--tokens" else tmp_path / "arg"
    with pytest.raises(SystemExit) as caught:
        main(["convert", str(exported), str(tmp_path / "back.thaw"), option, str(value)])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and f"argument {option}" in err and match in err and "Traceback" not in err
    assert not (tmp_path / "back.thaw").exists()


@pytest.mark.parametrize("value", ["0", "-5", "x"])
def test_a_page_size_of_no_tokens_is_an_argument_error(tmp_path, capsys, value):
    """It was refused once the file was read, as an IncompatibleSnapshotError (exit 1)."""
    with pytest.raises(SystemExit) as caught:
        main(["convert", str(tmp_path / "cache.safetensors"), str(tmp_path / "back.thaw"), "--page-size", value])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and f"argument --page-size: expected a whole number of tokens of 1 or more, got " \
        f"{value!r}" in err


@pytest.mark.parametrize("key, value, what", [
    ("thaw_tokens", "null", "a JSON list of token ids"),
    ("thaw_tokens", "[1.5, 2]", "a JSON list of token ids"),  # was truncated to [1, 2]
    ("thaw_tokens", "[1,", "a JSON list of token ids"),
    ("thaw_num_prompt_tokens", "1e3", "a JSON integer"),
    ("thaw_num_prompt_tokens", "-1", "a JSON integer from 0 to"),
    ("thaw_num_prompt_tokens", "100000", "a JSON integer from 0 to"),  # more than the tokens recorded
    ("thaw_model", "[]", "a model's identity: document.model must be an object"),
    ("thaw_model", "{}", "a model's identity: document.model.architecture is missing"),
    ("thaw_model", '{"architecture": 5, "config_digest": "x", "dtype": "float32"}',
     "a model's identity: document.model.architecture must be str, got 5"),  # was the writer's ValueError
    ("thaw_model", "{", "JSON"),
])
def test_an_exported_file_whose_thaw_metadata_is_malformed_is_refused_without_a_traceback(session, saved, tmp_path,
                                                                                         capsys, key, value, what):
    """A file exported by thaw and edited since (its thaw_* metadata are strings anyone can write): a TypeError's
    traceback for null or [] or {}, the writer's ValueError's for a member of the wrong type, and 1.5 taken as 1."""
    model, cache, tokens = session("llama-kv")
    exported = str(tmp_path / "cache.safetensors")
    assert main(["convert", saved(thaw_mlx.capture(model, cache, tokens)), exported]) == 0
    caches, metadata = load_prompt_cache(exported, return_metadata=True)
    save_prompt_cache(exported, caches, {**metadata, key: value})
    capsys.readouterr()
    assert main(["convert", exported, str(tmp_path / "back.thaw")]) == 1
    err = capsys.readouterr().err
    assert f"CorruptSnapshotError: {exported}: its {key} metadata is not {what}" in err and "Traceback" not in err
    assert not (tmp_path / "back.thaw").exists()
