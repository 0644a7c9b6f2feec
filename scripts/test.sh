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
# The set-ups run side by side, so each one's own check of the disk cannot see the others': check their sum here.
declare -A venv_of=([core]=.venv [vllm]=.venv-vllm [sglang]=.venv-sglang) venv_gb=([core]=2 [vllm]=4 [sglang]=3)
new_gb=0
for name in "${!venv_of[@]}"; do [ -x "${venv_of[$name]}/bin/python" ] || new_gb=$((new_gb + venv_gb[$name])); done
need_disk . "$new_gb" "the virtualenvs not yet made" || exit 1

status=0
timings=()
began=$SECONDS
# record LABEL SECONDS EXIT: print a run's wall time and keep it for the table at the end.
record() {
  local result=ok
  [ "$3" -eq 0 ] || result="FAILED (exit $3)"
  echo "=== $1: $2 s, $result"
  timings+=("$(printf '%6s s  %-76s %s' "$2" "$1" "$result")")
}

# timed LABEL COMMAND...: run COMMAND and record its wall time.
timed() {
  local label="$1" start=$SECONDS rc=0
  shift
  "$@" || rc=$?
  record "$label" $((SECONDS - start)) "$rc"
  return "$rc"
}

# The vLLM and SGLang set-ups (minutes of pip each) run in the background, beside the core set-up and tests:
# each is one job, in its own process group, that may run an hour, with its output in .cache/setup/NAME.out,
# shown when its area begins. Their editable installs of thaw take turns with the core's (install_thaw), and
# libthaw is built once, by the first. On exit, however it comes, the groups still running are killed.
declare -A set_up=() background=() began_at=()  # set_up: NAME's exit status; background: NAME's job, while it runs
stop_background() {
  local pid
  for pid in "${background[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
}
trap stop_background EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# background_setup NAME: start scripts/setup-NAME.sh as a job of its own (setsid: its own process group, so
# that stop_background ends it with everything it started), holding none of test.sh's input or output.
background_setup() {
  mkdir -p .cache/setup
  rm -f ".cache/setup/$1.out"
  began_at[$1]=$(date +%s)
  setsid timeout 3600 bash "scripts/setup-$1.sh" >".cache/setup/$1.out" 2>&1 </dev/null &
  background[$1]=$!
}

# setup NAME: run scripts/setup-NAME.sh once, or wait for it where it runs in the background; record its time.
setup() {
  local label="set-up ${venv_of[$1]} (scripts/setup-$1.sh)" out=".cache/setup/$1.out" pid="${background[$1]:-}" rc=0
  if [ -n "$pid" ]; then
    local waited=$SECONDS ended
    # Its seconds: to the end of the wait where it was still running, else to its output's last line.
    if kill -0 "$pid" 2>/dev/null; then
      wait "$pid" || rc=$?
      ended=$(date +%s)
    else
      wait "$pid" || rc=$?
      ended=$(stat -c %Y "$out" 2>/dev/null || date +%s)
    fi
    kill -TERM -- "-$pid" 2>/dev/null  # anything of its group left behind
    unset "background[$1]"
    echo "=== $label ran in the background (waited $((SECONDS - waited)) s for it); its output:"
    if [ -e "$out" ]; then cat "$out"; else echo "(none: it never started)"; fi
    [ ! -s "$out" ] || [ -z "$(tail -c 1 "$out")" ] || echo  # a step cut short ends with no newline
    [ "$rc" -ne 124 ] || echo "=== $label: stopped after an hour (timeout 3600)"
    record "$label, in the background" $((ended - began_at[$1])) "$rc"
    set_up[$1]=$rc
  elif [ -z "${set_up[$1]:-}" ]; then
    timed "$label" bash "scripts/setup-$1.sh" || rc=$?
    set_up[$1]=$rc
  fi
  return "${set_up[$1]}"
}

# run_area NAME TESTS...: set up NAME's venv and run its tests; each of TESTS is a path, with pytest options after
# it if any ("path opts").
run_area() {
  local name="$1" venv="${venv_of[$1]}"; shift
  local runs=() words
  for p in "$@"; do read -ra words <<<"$p"; [ -e "${words[0]}" ] && runs+=("$p"); done
  [ ${#runs[@]} -gt 0 ] || return 0
  if ! setup "$name"; then echo "=== set-up failed: scripts/setup-$name.sh"; status=1; return; fi
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
# An engine's set-up is wanted where its tests are, or tests/conformance, which drives every engine.
wanted() { local p; for p in "$@" tests/conformance; do [ -e "$p" ] && return 0; done; return 1; }
if wanted tests/vllm tests/langgraph tests/ray; then background_setup vllm; fi
if wanted tests/sglang tests/langgraph tests/ray; then background_setup sglang; fi
setup core
# ChatThaw (tests/langgraph) runs once per engine, each in the environment that has it; RayForkPool (tests/ray)
# likewise, on vLLM and SGLang their engines' tests only (-k vllm, -k sglang: the engine-free ones ran in the core's).
run_area core "${core_paths[@]}" "tests/langgraph --engine mlx --engine transformers" \
  "tests/ray --engine template --engine mlx"
run_area vllm tests/vllm "tests/langgraph --engine vllm" "tests/ray --engine vllm -k vllm"
run_area sglang tests/sglang "tests/langgraph --engine sglang" "tests/ray --engine sglang -k sglang"
for name in "${!background[@]}"; do setup "$name"; done  # one whose area is absent, for conformance
if [ -e tests/conformance ]; then
  echo "=== testing tests/conformance in .venv (drives every engine environment)"
  timed "pytest tests/conformance (.venv)" .venv/bin/python -m pytest --durations=15 tests/conformance || status=1
fi
for name in "${!set_up[@]}"; do
  if [ "${set_up[$name]}" -ne 0 ]; then
    echo "=== set-up failed: scripts/setup-$name.sh (exit ${set_up[$name]}); its output is above"
    status=1
  fi
done

echo "=== wall time of each set-up and test run"
printf '%s\n' "${timings[@]}"
printf '%6d s  in all\n' $((SECONDS - began))
exit $status
