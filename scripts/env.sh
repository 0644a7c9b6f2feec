# Sourced by the set-up and test scripts: offline model hubs and every cache inside the checkout.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XDG_CACHE_HOME="$ROOT/.cache/xdg" HF_HOME="$ROOT/.cache/hf" VLLM_CACHE_ROOT="$ROOT/.cache/vllm"
export TORCHINDUCTOR_CACHE_DIR="$ROOT/.cache/inductor" TRITON_CACHE_DIR="$ROOT/.cache/triton"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

# make_venv DIR: create DIR (a virtualenv) once; later runs reuse it.
make_venv() {
  [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"
  "$1/bin/python" -m pip install -q --upgrade pip setuptools wheel
}
