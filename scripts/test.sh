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
# record LABEL SECONDS EXIT: print a run's wall time and keep it for the table at the end.
record() {
  local result=ok
  [ "$3" -eq 0 ] || result="FAILED (exit $3)"
  echo "=== $1: $2 s, $result"
  timings+=("$(printf '%6s s  %-62s %s' "$2" "$1" "$result")")
}

# timed LABEL COMMAND...: run COMMAND and record its wall time.
timed() {
  local label="$1" start=$SECONDS rc=0
  shift
  "$@" || rc=$?
  record "$label" $((SECONDS - start)) "$rc"
  return "$rc"
}

# The vLLM and SGLang set-ups (minutes of pip each) run one after the other in the background, beside the core
# set-up and tests. Each one's output goes to .cache/setup/NAME.out, shown when its area begins, and its exit
# status and seconds to .cache/setup/NAME.status. Their editable installs of thaw take turns with the core's
# (install_thaw): libthaw is built once, by the first, before any test starts.
declare -A set_up=()  # NAME: "background" while it runs there, else its exit status
background_setups() {
  mkdir -p .cache/setup
  local name
  for name in "$@"; do rm -f ".cache/setup/$name.status"; set_up[$name]=background; done
  (
    for name in "$@"; do
      start=$SECONDS rc=0
      bash "scripts/setup-$name.sh" >".cache/setup/$name.out" 2>&1 || rc=$?
      echo "$rc $((SECONDS - start))" >".cache/setup/$name.status"
    done
  ) &
  background=$!
}

# setup NAME VENV: run scripts/setup-NAME.sh once, or wait for it where it runs in the background; record its time.
setup() {
  local label="set-up $2 (scripts/setup-$1.sh)"
  case "${set_up[$1]:-}" in
    "") timed "$label" bash "scripts/setup-$1.sh"; set_up[$1]=$? ;;
    background)
      local rc=1 secs=? waited=$SECONDS
      until [ -e ".cache/setup/$1.status" ] || ! kill -0 "$background" 2>/dev/null; do sleep 5; done
      [ -e ".cache/setup/$1.status" ] && read -r rc secs <".cache/setup/$1.status"
      echo "=== $label ran in the background (waited $((SECONDS - waited)) s for it); its output:"
      cat ".cache/setup/$1.out"
      record "$label, in the background" "$secs" "$rc"
      set_up[$1]=$rc ;;
  esac
  return "${set_up[$1]}"
}

# area: "venv setup-name tests..."; each of tests is a path, with pytest options after it if any ("path opts")
run_area() {
  local venv="$1" name="$2"; shift 2
  local runs=() words
  for p in "$@"; do read -ra words <<<"$p"; [ -e "${words[0]}" ] && runs+=("$p"); done
  [ ${#runs[@]} -gt 0 ] || return 0
  if ! setup "$name" "$venv"; then echo "=== set-up failed: scripts/setup-$name.sh"; status=1; return; fi
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
background_setups vllm sglang
setup core .venv
# ChatThaw (tests/langgraph) runs once per engine, each in the environment that has it; RayForkPool (tests/ray)
# on the engines quick to start in an actor.
run_area .venv core "${core_paths[@]}" "tests/langgraph --engine mlx --engine transformers" \
  "tests/ray --engine template --engine mlx"
run_area .venv-vllm vllm tests/vllm "tests/langgraph --engine vllm"
run_area .venv-sglang sglang tests/sglang "tests/langgraph --engine sglang"
wait  # conformance drives every engine's environment: each set-up has ended, even one whose area is absent
if [ -e tests/conformance ]; then
  echo "=== testing tests/conformance in .venv (drives every engine environment)"
  timed "pytest tests/conformance (.venv)" .venv/bin/python -m pytest --durations=15 tests/conformance || status=1
fi

echo "=== wall time of each set-up and test run"
printf '%s\n' "${timings[@]}"
printf '%6d s  in all\n' $((SECONDS - began))
exit $status
