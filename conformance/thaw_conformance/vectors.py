"""Format conformance: every golden vector reads as its description and rewrites byte-identically.

The vectors are spec/vectors in a checkout; an installed package carries a copy as package data (setup.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import thaw_format

from .checkout import CHECKOUT
from .results import CheckFailed, CheckResult, Recorder

VECTOR_CHECKS = {
    "vector_read": "verifies, and decodes to its description: id, version, document, every tensor's bytes",
    "vector_rewrite": "loading and writing it again gives the identical bytes (and id)",
}


PACKAGED_VECTORS = Path(__file__).resolve().parent / "golden_vectors"


def default_dir() -> Path:
    return CHECKOUT / "spec" / "vectors" if CHECKOUT is not None else PACKAGED_VECTORS


def check_vectors(directory: Path) -> list[CheckResult]:
    results = []
    paths = sorted(Path(directory).glob("*.thaw"))
    if not paths:
        recorder = Recorder("format", "-")
        recorder.missing("error", f"no golden vectors (*.thaw) in {directory}", VECTOR_CHECKS)
        return recorder.results
    for path in paths:
        recorder = Recorder("format", path.stem)
        data = path.read_bytes()
        with recorder.check("vector_read") as note:
            note(_read(path, data))
        with recorder.check("vector_rewrite") as note:
            snapshot = thaw_format.loads(data)
            again = thaw_format.dumps(snapshot)
            if again != data:
                first = next((i for i, (a, b) in enumerate(zip(again, data)) if a != b), min(len(again), len(data)))
                raise CheckFailed(f"rewritten bytes differ from byte {first} ({len(again)} vs {len(data)} bytes)")
            note(f"{len(data)} bytes identical")
        results += recorder.results
    return results


def _read(path: Path, data: bytes) -> str:
    description = path.with_suffix(".json")
    f = thaw_format.SnapshotFile(data)
    f.verify()
    if not description.exists():
        raise CheckFailed(f"{description.name} (the vector's description) is missing")
    expected = json.loads(description.read_text())
    for field, got in (("id", f.id), ("version", list(f.version)), ("document", f.document),
                       ("tensor names", f.names())):
        want = [t["name"] for t in expected["tensors"]] if field == "tensor names" else expected[field]
        if got != want:
            raise CheckFailed(f"{field}: read {str(got)[:80]}, the description has {str(want)[:80]}")
    for t in expected["tensors"]:
        got = f.tensor(t["name"])
        if (got.dtype, list(got.shape), got.data.hex()) != (t["dtype"], t["shape"], t["hex"]):
            raise CheckFailed(f"tensor {t['name']} differs from its description")
    return f"{len(expected['tensors'])} tensors as described, id {f.id[:19]}..."
