"""The `thaw` command: inspect, verify (several files, --json), log, diff; closed pipes and hostile names."""

import fcntl
import importlib
import importlib.metadata
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

import thaw_format as tf
from conftest import make_full_snapshot
from thaw_format.cli import main
from thaw_format.tensor import Tensor

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"


def test_inspect_shows_sections_tensors_and_identity(capsys):
    path = VECTORS / "scheduler_in_flight.thaw"
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert tf.load(path).id in out
    for text in ("format    1.0", "model     LlamaForCausalLM", "kv        2 layers (attention x2)",
                 "prefix    2 pages, 7 tokens", "scheduler 1 request: req-0 running (6+2 tokens)",
                 "lineage   parent -  label mid-generation", "kv/0/k", "[2, 4, 2, 4]"):
        assert text in out, text


def test_counts_of_one_are_singular_and_each_command_says_what_it_does(tmp_path, capsys):
    one = tmp_path / "one.thaw"
    tf.save(tf.Snapshot(weights=tf.Weights({"w": Tensor("float32", (2,), bytes(8))})), one)
    assert main(["verify", str(one)]) == 0
    assert ", 1 tensor, 1 chunk verified" in capsys.readouterr().out
    for command in ("inspect", "verify", "log", "diff"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert capsys.readouterr().out.split("\n\n")[1].strip()[0].isupper(), command  # a description line


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


def test_python_m_thaw_format_is_the_command(tmp_path):
    """`python -m thaw_format`, for an environment whose scripts folder is not on PATH (it said "No module named
    thaw_format.__main__"): the same command and exit codes, named "thaw" in its usage."""
    run = lambda *argv: subprocess.run([sys.executable, "-m", "thaw_format", *argv], capture_output=True, text=True)
    missing = run("verify", str(VECTORS / "kv_prefix_tree.thaw"), str(tmp_path / "nope.thaw"))
    assert missing.returncode == 2 and missing.stdout.startswith("OK sha256:"), missing.stderr
    assert "thaw verify: FileNotFoundError" in missing.stderr
    assert run("--help").stdout.startswith("usage: thaw ")


def _save(snap, path):
    tf.save(snap, path)
    return str(path)


def test_verify_several_files_reports_each_and_exits_with_the_worst(tmp_path, capsys):
    good = shutil.copy(VECTORS / "weights_only.thaw", tmp_path / "good.thaw")
    bad = tmp_path / "bad.thaw"
    data = bytearray(Path(good).read_bytes())
    region = tf.SnapshotFile(bytes(data)).info("weights/embed.weight")[2]
    data[region.offset] ^= 1
    bad.write_bytes(data)
    assert main(["verify", str(good), str(bad), str(VECTORS / "kv_prefix_tree.thaw")]) == 1
    out, err = capsys.readouterr()
    assert out.count("OK sha256:") == 2 and "good.thaw" in out and "kv_prefix_tree.thaw" in out
    assert "thaw verify: CorruptSnapshotError: " in err and "(in " + str(bad) + ")" in err and "'weights/embed.weight'" in err
    assert main(["verify", str(good), str(tmp_path / "missing.thaw")]) == 2  # unreadable beats corrupt


def test_verify_json(tmp_path, capsys):
    bad = tmp_path / "bad.thaw"
    bad.write_bytes(b"not a snapshot")
    assert main(["verify", "--json", str(VECTORS / "kv_prefix_tree.thaw"), str(bad)]) == 1
    ok, failed = json.loads(capsys.readouterr().out)
    assert ok == {"path": str(VECTORS / "kv_prefix_tree.thaw"), "ok": True, "id": tf.verify(VECTORS / "kv_prefix_tree.thaw"),
                  "bytes": (VECTORS / "kv_prefix_tree.thaw").stat().st_size, "tensors": 7, "chunks": 7}
    assert failed["ok"] is False and failed["error"] == "CorruptSnapshotError" and failed["message"]


def test_inspect_json_and_the_data_check_it_states(tmp_path, capsys):
    path = _save(make_full_snapshot(), tmp_path / "full.thaw")
    assert main(["inspect", "--json", path]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["id"] == tf.verify(path) and report["data_verified"] is False
    assert report["sections"]["model"]["architecture"] == "llama"
    assert report["sections"]["kv"]["kinds"] == {"attention": 1, "sliding_window": 1}
    assert report["sections"]["scheduler"]["requests"] == [
        {"id": "r0", "status": "running", "prompt_tokens": 6, "output_tokens": 1}]
    assert report["sections"]["lineage"]["label"] == "trunk"
    assert {"name": "weights/embed.weight", "dtype": "float32", "shape": [16, 8]}.items() <= \
        next(t for t in report["tensors"] if t["name"] == "weights/embed.weight").items()
    # inspect reads no data unless asked: it says so, and --verify catches a corrupt chunk
    data = bytearray(Path(path).read_bytes())
    data[tf.SnapshotFile(bytes(data)).info("weights/embed.weight")[2].offset] ^= 1
    Path(path).write_bytes(data)
    assert main(["inspect", path, "--brief"]) == 0
    assert "data      NOT checked" in capsys.readouterr().out
    assert main(["inspect", path, "--verify"]) == 1
    assert "CorruptSnapshotError" in capsys.readouterr().err


def test_log_follows_parents_in_the_folder(tmp_path, capsys):
    trunk = make_full_snapshot()
    trunk_id = tf.save(trunk, tmp_path / "trunk.thaw")
    child = make_full_snapshot()
    child.lineage = tf.Lineage(parent=trunk_id, label="branch 1", created="2026-11-24T00:00:00Z")
    child_id = tf.save(child, tmp_path / "child.thaw")
    (tmp_path / "unrelated.thaw").write_bytes(b"garbage")  # unreadable files in the folder are passed over
    assert main(["log", str(tmp_path / "child.thaw")]) == 0
    out = capsys.readouterr().out
    assert out.index(child_id) < out.index("branch 1") < out.index(f"parent   {trunk_id}") < \
        out.index(str(tmp_path / "trunk.thaw")) < out.index("(a root)")
    assert "writer   test-engine 1.0" in out and "created  2026-11-24T00:00:00Z" in out
    assert main(["log", "--json", str(tmp_path / "child.thaw")]) == 0
    assert [e["id"] for e in json.loads(capsys.readouterr().out)] == [child_id, trunk_id]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(tmp_path / "child.thaw", elsewhere / "child.thaw")
    assert main(["log", str(elsewhere / "child.thaw")]) == 0
    assert f"parent   {trunk_id} (not found among the *.thaw in {elsewhere}" in capsys.readouterr().out
    assert main(["log", str(elsewhere / "child.thaw"), "--search", str(tmp_path)]) == 0
    assert "(a root)" in capsys.readouterr().out
    for typo in (tmp_path / "tpyo", tmp_path / "trunk.thaw"):  # searched nothing and said nothing: a usage error
        with pytest.raises(SystemExit) as exit_:
            main(["log", str(elsewhere / "child.thaw"), "--search", str(typo)])
        assert exit_.value.code == 2 and f"--search: {str(typo)!r} is not a folder" in capsys.readouterr().err


def test_log_follows_the_first_copy_of_a_parent_and_names_the_others(tmp_path, capsys):
    """Several files with the parent's id (copies: the id is a digest of the header and every checksum): log took
    the first without a word. It still follows the first, in --search order, and names the others."""
    trunk_id = tf.save(make_full_snapshot(), tmp_path / "b.thaw")
    shutil.copy(tmp_path / "b.thaw", tmp_path / "a.thaw")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(tmp_path / "b.thaw", other / "c.thaw")
    child = make_full_snapshot()
    child.lineage = tf.Lineage(parent=trunk_id, label="branch 1")
    child_path = str(tmp_path / "child.thaw")
    tf.save(child, child_path)
    search = ["--search", str(tmp_path), "--search", str(other), "--search", str(tmp_path)]  # one folder twice
    assert main(["log", child_path, *search]) == 0
    out = capsys.readouterr().out
    assert f"snapshot {trunk_id}  {tmp_path / 'a.thaw'}\n" \
           f"  copies   {tmp_path / 'b.thaw'}, {other / 'c.thaw'} (the same id)\n" in out
    assert out.count("copies") == 1  # the file named on the command line has none: it is the one asked for
    assert main(["log", "--json", child_path, *search]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(e["path"], e["copies"]) for e in entries] == [
        (child_path, []), (str(tmp_path / "a.thaw"), [str(tmp_path / "b.thaw"), str(other / "c.thaw")])]


def test_log_names_no_file_a_copy_of_itself_when_its_folder_is_searched_by_two_spellings(tmp_path, capsys,
                                                                                         monkeypatch):
    """Files were told apart by their path's text: '--search . --search /abs/same' named trunk.thaw a copy of
    ./trunk.thaw. One file (its device and inode) reached by any spelling, or through a folder's symlink, is one."""
    trunk_id = tf.save(make_full_snapshot(), tmp_path / "trunk.thaw")
    child = make_full_snapshot()
    child.lineage = tf.Lineage(parent=trunk_id, label="branch 1")
    tf.save(child, tmp_path / "child.thaw")
    (tmp_path / "alias").symlink_to(tmp_path)
    monkeypatch.chdir(tmp_path)
    search = ["--search", ".", "--search", str(tmp_path), "--search", "alias", "--search", "./"]
    assert main(["log", "--json", "child.thaw", *search]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(e["path"], e["copies"]) for e in entries] == [("child.thaw", []), ("trunk.thaw", [])]


def test_diff_names_what_differs_by_name_and_checksum(tmp_path, capsys):
    a = _save(make_full_snapshot(), tmp_path / "a.thaw")
    assert main(["diff", a, a]) == 0
    assert capsys.readouterr().out.rstrip().endswith("same state")
    other = make_full_snapshot()
    other.weights.tensors["norm.weight"] = Tensor("bfloat16", (8,), bytes(16))
    other.weights.tensors["extra.bias"] = Tensor("float32", (2,), bytes(8))
    other.model.architecture = "mistral"
    other.prefix = tf.PrefixTree(parents=[-1, 0, 0], tokens=[[1, 2, 3, 4], [5, 6], [7, 8, 10]])
    other.scheduler.requests[0].output_token_ids = [43]
    b = _save(other, tmp_path / "b.thaw")
    assert main(["diff", a, b]) == 1
    out = capsys.readouterr().out
    crc = lambda path, name: f"{tf.mover.crc32c(tf.open(path).tensor(name).data):08x}"  # noqa: E731
    for text in ("model     architecture: llama -> mistral",
                 f"tensor    ~ weights/norm.weight  crc32c {crc(a, 'weights/norm.weight')} -> {crc(b, 'weights/norm.weight')}",
                 "tensor    + weights/extra.bias  float32 [2]",
                 "pages     2 shared, 1 only in A, 1 only in B",
                 "request   ~ r0: tokens_part_at 6",
                 "snapshots differ"):
        assert text in out, text
    assert main(["diff", "--json", a, b]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["same"] is False and \
        [e["name"] for e in report["tensors"]["differ"]] == ["weights/norm.weight", "prefix/token_ids"]


def test_diff_of_a_file_it_cannot_read_exits_2_not_differ(tmp_path, capsys):
    good = _save(tf.Snapshot(metadata={"a": 1}), tmp_path / "good.thaw")
    corrupt = tmp_path / "corrupt.thaw"
    corrupt.write_bytes(Path(good).read_bytes()[:100])
    # was 1, which `thaw diff a b || echo differ` reads as "the snapshots differ"
    assert main(["diff", good, str(corrupt)]) == 2 and "CorruptSnapshotError" in capsys.readouterr().err
    assert main(["diff", good, str(tmp_path / "missing.thaw")]) == 2
    assert main(["diff", good, good]) == 0 and main(["verify", str(corrupt)]) == 1


def test_closed_pipe_ends_quietly(tmp_path):
    """`thaw inspect F | head -1`: the reader is gone before the first write; no traceback, SIGPIPE's code."""
    thaw = Path(sys.executable).with_name("thaw")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([str(thaw), "inspect", str(VECTORS / "scheduler_in_flight.thaw")], stdout=write_end,
                                stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == ""


def test_a_closed_standard_output_is_no_traceback_and_keeps_the_exit_status():
    """`thaw verify F >&-`: Python starts with sys.stdout None; the result is still the exit status."""
    thaw = Path(sys.executable).with_name("thaw")
    for path, status in ((VECTORS / "weights_only.thaw", 0), (VECTORS / "nope.thaw", 2)):
        result = subprocess.run(["bash", "-c", '"$0" verify "$1" >&-', str(thaw), str(path)], stderr=subprocess.PIPE,
                                text=True)
        assert result.returncode == status and "Traceback" not in result.stderr, result.stderr


def test_control_characters_in_names_and_metadata_are_escaped(tmp_path, capsys):
    hostile = "w\x1b[2J\r\nOK sha256:forged\u202e"
    path = str(tmp_path / "hostile.thaw")
    tf.save(tf.Snapshot(weights=tf.Weights({hostile: Tensor("uint8", (1,), b"\0")}),
                        lineage=tf.Lineage(label="a\x07b"), metadata={"note\x9b": "x\ty"}), path)
    for argv in (["inspect", path], ["log", path], ["diff", path, _save(tf.Snapshot(), tmp_path / "empty.thaw")],
                 ["verify", path]):
        main(argv)
        out, err = capsys.readouterr()
        for stream in (out, err):
            assert not any(c in stream for c in "\x1b\r\x07\x9b\t\u202e"), argv
            assert not any(line.startswith("OK sha256:forged") for line in stream.splitlines()), argv
    main(["inspect", path])
    out = capsys.readouterr().out
    assert "weights/w\\x1b[2J\\r\\nOK sha256:forged\\u202e" in out and "label a\\x07b" in out
    assert main(["inspect", "--json", path]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"][0]["name"] == "weights/" + hostile


def test_a_missing_optional_dependency_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    monkeypatch.delitem(sys.modules, "thaw_format.torch", raising=False)
    with pytest.raises(ImportError, match=r"thaw_format\.torch needs torch.*pip install 'thaw\[torch\]'"):
        importlib.import_module("thaw_format.torch")


UNAVAILABLE = """
import sys
sys.modules["mlx_lm"] = None  # as if the mlx extra were not installed: `thaw convert` cannot be imported
from thaw_format.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv", [["convert", "a", "b"], ["convert", "--help"], ["convert", "--model", "m", "a", "b"]])
def test_a_plugin_command_that_cannot_be_imported_says_so_for_any_arguments(argv):
    done = subprocess.run([sys.executable, "-c", UNAVAILABLE, *argv], capture_output=True, text=True)
    # --help and options were "unrecognized arguments", which hid why the command could not run
    assert done.returncode == 2 and "convert" in done.stderr and "is unavailable here" in done.stderr, done.stderr
    assert "pip install 'thaw[mlx]'" in done.stderr and "unrecognized" not in done.stderr


def test_progress_bar_only_on_a_terminal(tmp_path):
    """verify draws a bar on stderr when stdout is a terminal (a pty of 100 columns here), never into a pipe."""
    pytest.importorskip("tqdm", reason="the progress bar comes with the cli extra (tqdm), not installed here")
    thaw, path = Path(sys.executable).with_name("thaw"), str(VECTORS / "kv_prefix_tree.thaw")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with subprocess.Popen([str(thaw), "verify", path], stdout=slave, stderr=slave) as process:
        os.close(slave)
        screen = b""
        while chunk := _read_or_empty(master):
            screen += chunk
    os.close(master)
    assert process.returncode == 0 and b"verifying kv_prefix_tree.thaw:" in screen and b"OK sha256:" in screen
    piped = subprocess.run([str(thaw), "verify", path], capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stderr == "" and piped.stdout.startswith("OK sha256:")


def _read_or_empty(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the other side of the pty has closed
        return b""


@pytest.mark.parametrize("limit", ["-1", "x"])
def test_inspect_refuses_a_limit_that_is_not_a_count(tmp_path, capsys, limit):
    path = tmp_path / "w.thaw"
    tf.save_file({"a": Tensor("uint8", (1,), b"a"), "b": Tensor("uint8", (1,), b"b")}, path)
    with pytest.raises(SystemExit) as caught:  # -1 showed one row of two and said "... and 3 more"
        main(["inspect", "--limit", limit, str(path)])
    assert caught.value.code == 2 and "0 or more" in capsys.readouterr().err


def test_version_is_the_projects_and_names_the_format(capsys):
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11 reads TOML; 3.10 does not")
    with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"thaw {project['version']} (snapshot format {tf.FORMAT_VERSION[0]}." \
                                      f"{tf.FORMAT_VERSION[1]})\n"
    assert tf.__version__ == project["version"]


def test_version_comes_from_the_checkout_else_the_installed_metadata(tmp_path):
    """Run from a checkout, its pyproject.toml says the version (another copy may be installed); elsewhere, the
    installed distribution's metadata, else "unknown"."""
    from thaw_format import version

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[build-system]\nrequires = []\n\n[project]\nname = "thaw"\nversion = "9.8.7"\n\n'
                         '[tool.other]\nversion = "0.0.1"\n')
    assert version._checkout_version(pyproject) == "9.8.7"
    pyproject.write_text('[project]\nname = "other"\nversion = "9.8.7"\n')
    assert version._checkout_version(pyproject) is None
    assert version._checkout_version(tmp_path / "missing.toml") is None
    # version.py alone in a folder with no pyproject.toml above: what an installed package sees
    (tmp_path / "pkg").mkdir()
    shutil.copy(version.__file__, tmp_path / "pkg" / "version.py")
    done = subprocess.run([sys.executable, "-c", "import version; print(version.package_version())"],
                          cwd=tmp_path / "pkg", capture_output=True, text=True, check=True)
    try:
        expected = importlib.metadata.version("thaw")
    except importlib.metadata.PackageNotFoundError:
        expected = "unknown"
    assert done.stdout == f"{expected}\n"
