#!/usr/bin/env bash
# The core environment: thaw_format, libthaw, torch (CPU), MLX and the test tools, in .venv.
set -euo pipefail
source "$(dirname "$0")/env.sh"
make_venv "$ROOT/.venv"
"$ROOT/.venv/bin/pip" install -q torch==2.13.0
"$ROOT/.venv/bin/pip" install -q -e "$ROOT[torch,mlx,test]"
