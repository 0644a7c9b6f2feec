"""The `thaw` command: inspect prints the sections, verify exits non-zero with a precise message."""

import shutil
import subprocess
import sys
from pathlib import Path

import thaw_format as tf
from thaw_format.cli import main

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"


def test_inspect_shows_sections_tensors_and_identity(capsys):
    path = VECTORS / "scheduler_in_flight.thaw"
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert tf.load(path).id in out
    for text in ("format    1.0", "model     LlamaForCausalLM", "kv        2 layers (attention x2)",
                 "prefix    2 pages, 7 tokens", "scheduler 1 requests: req-0 running (6+2 tokens)",
                 "lineage   parent -  label mid-generation", "kv/0/k", "[2, 4, 2, 4]"):
        assert text in out, text


def test_verify_ok_and_corrupt(tmp_path, capsys):
    good = tmp_path / "good.thaw"
    shutil.copy(VECTORS / "weights_only.thaw", good)
    assert main(["verify", str(good)]) == 0
    assert capsys.readouterr().out.startswith("OK sha256:")
    bad = tmp_path / "bad.thaw"
    data = bytearray(good.read_bytes())
    region = tf.SnapshotFile(bytes(data)).info("weights/embed.weight")[2]
    data[region.offset + 5] ^= 0x10
    bad.write_bytes(data)
    assert main(["verify", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "CorruptSnapshotError" in err and "'weights/embed.weight'" in err and f"[{region.offset}," in err


def test_console_script_is_installed(tmp_path):
    thaw = Path(sys.executable).with_name("thaw")
    result = subprocess.run([str(thaw), "verify", str(VECTORS / "kv_prefix_tree.thaw")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    missing = subprocess.run([str(thaw), "verify", str(tmp_path / "nope.thaw")], capture_output=True, text=True)
    assert missing.returncode == 2 and "No such file" in missing.stderr
