#!/usr/bin/env bash
# Set up every environment and run every test: the format and libthaw and MLX in .venv, vLLM in .venv-vllm,
# SGLang in .venv-sglang. Exits non-zero if any area fails. Under CI a missing engine fails instead of skipping.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
if [ -n "${CI:-}" ]; then export THAW_REQUIRE_ENGINES=1; fi

status=0
# area: "venv setup-script test-paths..."
run_area() {
  local venv="$1" setup="$2"; shift 2
  local paths=()
  for p in "$@"; do [ -e "$p" ] && paths+=("$p"); done
  [ ${#paths[@]} -gt 0 ] || return 0
  if ! bash "$setup"; then echo "=== set-up failed: $setup"; status=1; return; fi
  # One pytest per directory: each directory's conftest is imported as the module `conftest`.
  for p in "${paths[@]}"; do
    echo "=== testing $p in $venv"
    "$venv/bin/python" -m pytest "$p" || status=1
  done
}

core_paths=()
for p in tests/*/; do
  case "$p" in tests/vllm/|tests/langgraph/|tests/sglang/|tests/conformance/) ;; *) core_paths+=("${p%/}") ;; esac
done
run_area .venv scripts/setup-core.sh "${core_paths[@]}"
run_area .venv-vllm scripts/setup-vllm.sh tests/vllm tests/langgraph
run_area .venv-sglang scripts/setup-sglang.sh tests/sglang
if [ -e tests/conformance ]; then
  echo "=== testing tests/conformance in .venv (drives every engine environment)"
  .venv/bin/python -m pytest tests/conformance || status=1
fi
exit $status
