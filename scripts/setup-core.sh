#!/usr/bin/env bash
# The core environment: thaw_format, libthaw, torch (CPU), MLX and the test tools, in .venv. Idempotent.
set -euo pipefail
source "$(dirname "$0")/env.sh"
hold_lock "$ROOT/.cache/setup/core.lock" .venv
start_log core .venv
make_venv "$ROOT/.venv" 2
step "torch 2.13.0 (CPU build)" "$ROOT/.venv/bin/pip" install torch==2.13.0
install_thaw "$ROOT/.venv" torch,mlx,cli,test,langgraph,transformers,ray
