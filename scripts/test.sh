#!/usr/bin/env bash
# Set up every environment and run every test: the format and libthaw and MLX in .venv, vLLM in .venv-vllm,
# SGLang in .venv-sglang. Exits non-zero if any area fails. Under CI a missing engine fails instead of skipping.
# Each set-up and each pytest prints its wall time, pytest names its 15 slowest tests, and a table of the times
# ends the log, so every CI log shows where its time went.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
if [ -n "${CI:-}" ]; then export THAW_REQUIRE_ENGINES=1; fi
need_disk "${TMPDIR:-/tmp}" 1 "the tests' temporary files" || exit 1

status=0
timings=()
began=$SECONDS
# timed LABEL COMMAND...: run COMMAND, print its wall time and keep it for the table at the end.
timed() {
  local label="$1" start=$SECONDS rc=0
  shift
  "$@" || rc=$?
  local result=ok
  [ "$rc" -eq 0 ] || result="FAILED (exit $rc)"
  echo "=== $label: $((SECONDS - start)) s, $result"
  timings+=("$(printf '%6d s  %-62s %s' $((SECONDS - start)) "$label" "$result")")
  return "$rc"
}

# area: "venv setup-script tests..."; each of tests is a path, with pytest options after it if any ("path opts")
run_area() {
  local venv="$1" setup="$2"; shift 2
  local runs=() words
  for p in "$@"; do read -ra words <<<"$p"; [ -e "${words[0]}" ] && runs+=("$p"); done
  [ ${#runs[@]} -gt 0 ] || return 0
  if ! timed "set-up $venv ($setup)" bash "$setup"; then echo "=== set-up failed: $setup"; status=1; return; fi
  # One pytest per directory: each directory's conftest is imported as the module `conftest`.
  for p in "${runs[@]}"; do
    read -ra words <<<"$p"
    echo "=== testing $p in $venv"
    timed "pytest $p ($venv)" "$venv/bin/python" -m pytest --durations=15 "${words[@]}" || status=1
  done
}

core_paths=()
for p in tests/*/; do
  case "$p" in tests/vllm/|tests/langgraph/|tests/ray/|tests/sglang/|tests/conformance/) ;; *) core_paths+=("${p%/}") ;; esac
done
# ChatThaw (tests/langgraph) runs once per engine, each in the environment that has it; RayForkPool (tests/ray)
# on the engines quick to start in an actor.
run_area .venv scripts/setup-core.sh "${core_paths[@]}" "tests/langgraph --engine mlx --engine transformers" \
  "tests/ray --engine template --engine mlx"
run_area .venv-vllm scripts/setup-vllm.sh tests/vllm "tests/langgraph --engine vllm"
run_area .venv-sglang scripts/setup-sglang.sh tests/sglang "tests/langgraph --engine sglang"
if [ -e tests/conformance ]; then
  echo "=== testing tests/conformance in .venv (drives every engine environment)"
  timed "pytest tests/conformance (.venv)" \
    .venv/bin/python -m pytest --durations=15 tests/conformance || status=1
fi

echo "=== wall time of each set-up and test run"
printf '%s\n' "${timings[@]}"
printf '%6d s  in all\n' $((SECONDS - began))
exit $status
