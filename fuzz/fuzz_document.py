"""Coverage-guided fuzzing of the JSON document and its section rules, behind valid checksums.

An input is a JSON document, a NUL byte, then tensor bytes. The harness wraps it in a container whose
regions are sized from the document's own `tensors` list (filled from the tensor bytes, zero-padded), with
every checksum right, so each mutation lands on the document decoder instead of a CRC. Same outcome rule as
fuzz_reader.py. Make seeds from the hostile corpus and the golden vectors, then run:

    .venv/bin/python fuzz/fuzz_document.py --seeds .cache/fuzz-document-seeds && mkdir -p .cache/fuzz-document-corpus
    .venv/bin/python fuzz/fuzz_document.py .cache/fuzz-document-corpus .cache/fuzz-document-seeds \\
        -dict=fuzz/thaw.dict -max_len=16384 -timeout=10 -rss_limit_mb=2048 -max_total_time=1200
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ == "__main__" and "--seeds" not in sys.argv:
    import atheris

    with atheris.instrument_imports(include=["thaw_format"]):
        import fuzz_reader
else:
    import fuzz_reader

from hostile import craft  # noqa: E402 - on sys.path via fuzz_reader, which imported thaw_format first

MAX_TENSOR_BYTES = 1 << 16


def parse(document: bytes):
    try:
        return json.loads(document)
    except Exception:  # noqa: BLE001 - the reader, not the harness, judges a broken document
        return None


def region_sizes(doc) -> list[int]:
    """Byte size of each `tensors` entry the document declares (0 where it declares nonsense or too much)."""
    try:
        sizes = []
        for entry in doc["tensors"][:64]:
            shape, itemsize = entry["shape"], craft.ITEMSIZE[entry["dtype"]]
            size = math.prod(shape) * itemsize if all(isinstance(d, int) and d >= 0 for d in shape) else 0
            sizes.append(size if size <= MAX_TENSOR_BYTES else 0)
        return sizes
    except Exception:  # noqa: BLE001
        return []


def feature_bits(doc) -> dict:
    """The feature bits the writer would set for this content, so the seeds start valid."""
    def has(section, key):
        return isinstance(doc, dict) and isinstance(doc.get(section), dict) and doc[section].get(key) is not None

    return {"required": int(has("weights", "ref")), "optional": int(has("prefix", "hash"))}


def build(data: bytes) -> bytes:
    document, _, tensor_bytes = data.partition(b"\0")
    doc = parse(document)
    payloads, position = [], 0
    for size in region_sizes(doc):
        payloads.append(tensor_bytes[position : position + size].ljust(size, b"\0"))
        position += size
    return bytes(craft.container(document, payloads, **feature_bits(doc)))


def check(data: bytes) -> None:
    fuzz_reader.read_or_refuse(build(data))


def write_seeds(directory: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    directory.mkdir(parents=True, exist_ok=True)
    for source in [*(root / "tests/hostile/corpus").glob("*.thaw"), *(root / "spec/vectors").glob("*.thaw")]:
        data = source.read_bytes()
        if len(data) >= craft.PREAMBLE.size and craft.header_length(data) <= len(data):
            w = craft.where(data)
            document = data[w.json_start : w.json_start + w.json_length]
            payloads = b"".join(data[o : o + n] for o, n, _, _ in w.regions if o + n <= len(data))
            (directory / source.stem).write_bytes(document + b"\0" + payloads)


def main() -> None:
    if sys.argv[1:2] == ["--seeds"]:
        write_seeds(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
