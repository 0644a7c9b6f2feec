"""Resume snapshots in a new process, where the model is rebuilt from the snapshot alone and torch is blocked.

run_in_new_process(jobs) starts this file with jobs {"snapshot": path, "suffix": [ids], "max_tokens": n} and
returns, per job, {"tokens": [...], "kv_digest": hex} (the KV after generating).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.modules["torch"] = None  # any import of torch now fails: the MLX path must never need it

import thaw_format  # noqa: E402
import thaw_mlx  # noqa: E402
from sessions import kv_digest  # noqa: E402


def resume(job: dict) -> dict:
    snapshot = thaw_format.load(job["snapshot"])
    model = thaw_mlx.load_model(snapshot)
    cache = thaw_mlx.restore(model, snapshot)
    tokens = thaw_mlx.snapshot_tokens(snapshot) + job["suffix"]
    out = list(thaw_mlx.generate(model, cache, tokens, job["max_tokens"], sampler=thaw_mlx.sampler_of(snapshot)))
    return {"tokens": out, "kv_digest": kv_digest(model, cache, tokens + out)}


def run_in_new_process(jobs: list[dict]) -> list[dict]:
    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__, json.dumps(jobs)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


if __name__ == "__main__":
    print(json.dumps([resume(job) for job in json.loads(sys.argv[1])]))
