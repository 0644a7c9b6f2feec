# Sourced by the set-up and test scripts: offline model hubs and every cache inside the checkout.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XDG_CACHE_HOME="$ROOT/.cache/xdg" HF_HOME="$ROOT/.cache/hf" VLLM_CACHE_ROOT="$ROOT/.cache/vllm"
export TORCHINDUCTOR_CACHE_DIR="$ROOT/.cache/inductor" TRITON_CACHE_DIR="$ROOT/.cache/triton"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

# start_log NAME WHAT: set-up of WHAT begins; pip's output goes to .cache/setup/NAME.log, started afresh.
start_log() {
  mkdir -p "$ROOT/.cache/setup"
  SETUP_LOG="$ROOT/.cache/setup/$1.log"
  : >"$SETUP_LOG"
  echo "setting up $2 (pip's output: ${SETUP_LOG#"$ROOT/"})"
}

# step LABEL COMMAND...: one line per step with its seconds; the command's output goes to $SETUP_LOG, and on
# failure the log's end is shown and the command's status returned.
step() {
  local label="$1" start=$SECONDS status=0
  shift
  printf '  %-64s' "$label"
  "$@" >>"$SETUP_LOG" 2>&1 || status=$?
  if [ "$status" -eq 0 ]; then
    printf '%4ds\n' $((SECONDS - start))
  else
    printf 'FAILED (exit %d)\n--- the last 60 lines of %s:\n' "$status" "$SETUP_LOG"
    tail -n 60 "$SETUP_LOG"
  fi
  return "$status"
}

# need_disk DIR GB WHAT: fail, saying so, unless the disk holding DIR has GB free for WHAT. A full disk
# otherwise shows up as pip's or pytest's "[Errno 28]" deep in a log, far from its cause.
need_disk() {
  local free_kb
  free_kb=$(df -Pk "$1" | awk 'NR == 2 { print $4 }')
  if [ -z "$free_kb" ]; then
    echo "error: cannot tell the free disk space where $1 lies (df failed)" >&2
    return 1
  fi
  if [ "$free_kb" -lt $(($2 * 1024 * 1024)) ]; then
    echo "error: $3 needs about $2 GB of disk, but only $((free_kb / 1024)) MB are free where $1 lies" >&2
    return 1
  fi
}

# make_venv DIR GB: create DIR (a virtualenv of about GB once installed) once; later runs reuse it.
make_venv() {
  if [ ! -x "$1/bin/python" ]; then
    need_disk "$(dirname "$1")" "$2" "${1#"$ROOT/"}"
    step "create ${1#"$ROOT/"}" "$PYTHON" -m venv "$1"
  fi
  step "pip, setuptools, wheel" "$1/bin/python" -m pip install --upgrade pip setuptools wheel
}

# hold_lock FILE WHAT: wait (at most 30 minutes) for the lock FILE, then hold it until this script ends, so that
# no other script (test.sh's set-ups, demo.sh) changes WHAT meanwhile.
hold_lock() {
  mkdir -p "$(dirname "$1")"
  exec 9>"$1"
  if ! flock -w 1800 9; then
    echo "error: waited 30 minutes for $2 (lock ${1#"$ROOT/"}), which another set-up still holds" >&2
    return 1
  fi
}

# install_thaw VENV EXTRAS: install this checkout, editable, into VENV, one set-up at a time (test.sh runs them
# side by side): the first builds libthaw in the checkout, the others find it current and leave it (setup.py).
install_thaw() {
  local lock="$ROOT/.cache/setup/thaw-install.lock"
  step "thaw (editable; libthaw built unless the checkout's is current) with [$2]" \
    flock -w 1800 -E 75 "$lock" "$1/bin/pip" install -e "$ROOT[$2]" && return
  local rc=$?
  [ "$rc" -ne 75 ] || echo "error: waited 30 minutes for another set-up's install of thaw (lock ${lock#"$ROOT/"})" >&2
  return "$rc"
}
