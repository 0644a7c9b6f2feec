"""Without the compiled module thaw_format still works, on the portable path, and says why."""

import subprocess
import sys

SCRIPT = r"""
import sys
sys.modules["thaw_format._libthaw"] = None  # as if it had not been built
import numpy as np
import thaw_format
from thaw_format import Snapshot, Weights, as_tensor, load, save
print(thaw_format.backend())
w = {"a": as_tensor(np.arange(300_000, dtype=np.float32)), "b": as_tensor(np.ones((3, 5), dtype=np.int64))}
save(Snapshot(weights=Weights(tensors=w)), sys.argv[1])
back = load(sys.argv[1]).weights.tensors
assert all(bytes(back[k].data) == bytes(w[k].data) for k in w)
print("round trip ok")
"""


def test_portable_path_is_reported_and_round_trips(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "s.thaw")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.startswith("python (crc32c package); libthaw unavailable: thaw_format._libthaw is not built")
    assert second == "round trip ok"
