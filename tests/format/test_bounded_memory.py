"""A snapshot much larger than the reader's memory budget is verified and read piecewise with bounded RSS."""

import subprocess
import sys
import textwrap

import numpy as np

import thaw_format as tf

SIZE_MB = 256


def _peak_rss_mb(code: str) -> float:
    script = textwrap.dedent(code) + textwrap.dedent("""
        import resource
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def test_verify_and_lazy_reads_use_bounded_memory(tmp_path):
    source = np.lib.format.open_memmap(tmp_path / "src.npy", mode="w+", dtype=np.uint8, shape=(SIZE_MB << 20,))
    source[:: 4096] = 7  # touch every page so the data is not all zeros
    big = tmp_path / "big.thaw"
    tf.save_file({"big": source, "small": np.arange(8, dtype=np.int64)}, big)
    del source
    baseline = _peak_rss_mb("import thaw_format")
    verify = _peak_rss_mb(f"import thaw_format as tf; tf.verify({str(big)!r})")
    one = _peak_rss_mb(f"import thaw_format as tf; f = tf.open({str(big)!r}); assert f.tensor('weights/small').nbytes == 64")
    # The file is 256 MiB; verification streams it through a fixed staging buffer.
    assert verify - baseline < 64, (baseline, verify)
    assert one - baseline < 16, (baseline, one)
