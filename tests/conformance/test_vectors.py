"""Format conformance: the golden vectors pass, and a damaged or re-described vector fails."""

import json
import shutil

from thaw_conformance.vectors import check_vectors, default_dir


def test_every_vector_reads_and_rewrites():
    results = check_vectors(default_dir())
    assert len(results) == 2 * len(list(default_dir().glob("*.thaw"))) >= 8
    assert all(r.status == "passed" for r in results), [r for r in results if r.status != "passed"]


def test_a_damaged_vector_fails(tmp_path):
    for path in default_dir().glob("weights_only.*"):
        shutil.copy(path, tmp_path)
    data = bytearray((tmp_path / "weights_only.thaw").read_bytes())
    data[-40] ^= 0xFF  # inside the trailer's checksums
    (tmp_path / "weights_only.thaw").write_bytes(data)
    got = {r.check: r.status for r in check_vectors(tmp_path)}
    assert got["vector_read"] in ("failed", "error") and got["vector_rewrite"] in ("failed", "error")


def test_a_vector_that_disagrees_with_its_description_fails(tmp_path):
    for path in default_dir().glob("kv_prefix_tree.*"):
        shutil.copy(path, tmp_path)
    description = json.loads((tmp_path / "kv_prefix_tree.json").read_text())
    first = description["tensors"][0]["hex"]
    description["tensors"][0]["hex"] = f"{int(first[:2], 16) ^ 0xFF:02x}" + first[2:]
    (tmp_path / "kv_prefix_tree.json").write_text(json.dumps(description))
    got = {r.check: r for r in check_vectors(tmp_path)}
    assert got["vector_read"].status == "failed" and got["vector_rewrite"].status == "passed"


def test_no_vectors_is_an_error(tmp_path):
    assert {r.status for r in check_vectors(tmp_path)} == {"error"}
