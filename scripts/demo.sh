#!/usr/bin/env bash
# The thaw fork demo: builds .venv-vllm if needed, makes a tiny local model, forks a running vLLM engine.
# Arguments go to examples/fork_demo.py (for example --processes, --trunk-tokens 4096). The engine's log goes
# to .cache/demo/engine.log; the trunk's snapshot to ./trunk.thaw, which the README's "Use" examples open.
set -euo pipefail
source "$(dirname "$0")/env.sh"
bash "$ROOT/scripts/setup-vllm.sh"
export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}"
exec "$ROOT/.venv-vllm/bin/python" "$ROOT/examples/fork_demo.py" --log "$ROOT/.cache/demo/engine.log" "$@"
