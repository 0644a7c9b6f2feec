"""Restore a snapshot in a NEW process and run what the parent ran next.

run_in_new_process(job) starts this file with {"model": dir, "snapshot": path, "prompt": [ids]} and returns
{"pages": {prefix: sha256 of its bytes}, "greedy": [...], "seeded": [...], "cached": n, "finished": {id: [...]}}.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path


def page_digests(snapshot) -> dict:
    """SHA-256 of every page's bytes (all layers and roles), keyed by the page's token ids from its root."""
    from thaw_conformance.compare import pages_by_prefix
    return {",".join(map(str, prefix)): hashlib.sha256(b"".join(bytes(t.data) for _, t in parts)).hexdigest()
            for prefix, parts in pages_by_prefix(snapshot).items()}


def run(job: dict) -> dict:
    import thaw_format
    from thaw_format.sdk import greedy, seeded
    from thaw_transformers import TransformersEngine

    engine = TransformersEngine.start(job["model"])
    engine.restore(thaw_format.load(job["snapshot"]))
    pages = page_digests(engine.capture(include_weights=False))
    finished = {rid: f.output_token_ids for rid, f in engine.finish().items()}
    out = engine.generate(job["prompt"], greedy(8))
    return {"pages": pages, "greedy": out.token_ids, "cached": out.cached_tokens, "finished": finished,
            "seeded": engine.generate(job["prompt"], seeded(1234, 8)).token_ids}


def run_in_new_process(job: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, json.dumps(job)], env=dict(os.environ), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(run(json.loads(sys.argv[1]))))
