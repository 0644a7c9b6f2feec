#!/usr/bin/env bash
# The SGLang environment (.venv-sglang): sglang 0.5.23 on the local CPU torch, as shared/ENGINES.md describes.
# SGLang's PyPI dependencies are CUDA builds, so it is installed without them and its pure-Python needs are
# installed under a constraint that keeps the CPU torch. Idempotent: a second run only re-checks.
set -euo pipefail
source "$(dirname "$0")/env.sh"
VENV="$ROOT/.venv-sglang"
PIP="$VENV/bin/pip"
hold_lock "$ROOT/.cache/setup/sglang.lock" .venv-sglang
start_log sglang .venv-sglang
make_venv "$VENV" 3

step "torch 2.13.0 (CPU build)" "$PIP" install torch==2.13.0
step "sglang 0.5.23 (without its CUDA dependencies)" "$PIP" install --no-deps sglang==0.5.23

CONSTRAINT="$(mktemp)"
trap 'rm -f "$CONSTRAINT"' EXIT
echo "torch==2.13.0+cpu" >"$CONSTRAINT"
step "sglang's pure-Python dependencies, torch kept at the CPU build" "$PIP" install -c "$CONSTRAINT" \
  aiohttp fastapi uvicorn uvloop pyzmq orjson msgspec psutil setproctitle pybase64 requests numpy \
  transformers==5.19.0 tokenizers==0.23.2 safetensors huggingface-hub pydantic pillow einops interegular \
  partial_json_parser prometheus-client python-multipart xxhash zstandard tqdm regex sentencepiece==0.2.1 \
  tiktoken openai==2.8.0 openai-harmony==0.0.4 watchfiles blobfile scipy IPython dill gguf \
  "llguidance>=1.7.6,<2" xgrammar==0.2.7 compressed-tensors==0.18.0 distro easydict anthropic \
  python-dateutil packaging
echo "  (deliberate: sglang's pins of torch 2.14.1 and CUDA kernels are left out for the CPU torch; pip's log calls that an ERROR)"
# SGLang imports torchvision at start; PyPI's build is CUDA-linked, so only its Python part is wanted.
step "torchvision 0.28 (its Python part only)" "$PIP" install --no-deps "torchvision==0.28.*"

# The CPU stand-ins (see scripts/sglang_cpu/README.md): the sgl_kernel module that raises on every op, and
# the .pth that keeps torchvision's CUDA-linked meta registrations from loading, in every process.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$SITE/sgl_kernel"
cp -r "$ROOT/scripts/sglang_cpu/sgl_kernel" "$SITE/sgl_kernel"
cp "$ROOT/scripts/sglang_cpu/thaw_sglang_cpu.pth" "$SITE/thaw_sglang_cpu.pth"

install_thaw "$VENV" cli,test,langgraph,ray
