"""Coverage-guided fuzzing of the snapshot reader with atheris (libFuzzer).

    .venv/bin/pip install atheris
    mkdir -p .cache/fuzz-corpus
    .venv/bin/python fuzz/fuzz_reader.py .cache/fuzz-corpus tests/hostile/corpus spec/vectors \\
        -dict=fuzz/thaw.dict -max_len=65536 -timeout=10 -rss_limit_mb=2048 -runs=200000

Each input is read twice: as it is, and "repaired" (header CRC re-sealed, trailer recomputed wherever the
table allows, see tests/hostile/craft.py) so that mutations reach the structural checks behind the checksums.
The outcome must be a SnapshotError, or a snapshot that the writer writes back and that reads back equal.
Any other exception is a crash; libFuzzer's -timeout and -rss_limit_mb turn a hang or a runaway allocation
into one too. New inputs go to the first directory; crashes are written as crash-<sha1> in the working
directory: add each one to tests/hostile/corpus.py once fixed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["thaw_format"]):
        import thaw_format as tf
else:  # imported by tests/hostile/test_fuzz_harness.py, which runs check() over the corpus without atheris
    import thaw_format as tf

from hostile.craft import repair  # noqa: E402 - after the instrumented import of thaw_format


def read_or_refuse(data: bytes) -> None:
    try:
        snapshot = tf.loads(data)
        tf.SnapshotFile(data).verify()  # the zero-copy path and the padding check
    except tf.SnapshotError:
        return
    again = tf.loads(tf.dumps(snapshot))
    if again != snapshot:
        raise AssertionError("a snapshot the reader accepted does not survive writing and reading back")


def check(data: bytes) -> None:
    read_or_refuse(data)
    repaired = repair(data)
    if repaired != data:
        read_or_refuse(repaired)


def main() -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
