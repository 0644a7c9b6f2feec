#!/usr/bin/env bash
# The GPU check (issue 15), ONE command on the GPU machine (one NVIDIA H200, CUDA 13 nvcc, Python 3.12 with
# torch, numpy, safetensors, pytest; no network), at most 8 minutes:
#   1. installs the carried wheels from .whl/ into /tmp/site,
#   2. builds libthaw (C and CUDA, nvcc there) in place,
#   3. runs the GPU tests: tests/libthaw/test_cuda.py, test_stage_plan.py, tests/transformers/test_gpu.py and
#      test_bench_gpu.py (THAW_REQUIRE_GPU=1 turns a GPU test's skip into a failure),
#   4. runs benchmarks/bench_gpu.py (the ring at its default and two larger settings), writing benchmarks/results/gpu_h200.json|md (copied to $OUT when set).
#
# The wheels (.whl/ is ignored by git; fetch them on the CPU machine, from the repository root):
#   cffi-2.0.0, pycparser-2.23 (cffi's one dependency), crc32c-2.8 (a thaw_format dependency), and
#   transformers-5.24.0 (thaw_transformers accepts only the tested 5.24.x; the image has 5.17; its needs,
#   huggingface-hub>=1.31, tokenizers 0.23.x, safetensors>=0.8, are in the image):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#       cffi==2.0.0 pycparser==2.23 crc32c==2.8 transformers==5.24.0
# Run there (the device tool): carry [".whl"], command `bash scripts/gpu-check.sh`, timeout_s 540.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
LOG=${OUT:-$ROOT/benchmarks/results}/gpu-check.log
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 THAW_REQUIRE_GPU=1

section() { echo; echo "== $* ($(date -u +%T))"; }

section "wheels"
ls .whl/*.whl || { echo "no .whl/: fetch the wheels listed in this script's header"; exit 1; }
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$ROOT:$ROOT/adapters:$ROOT/conformance:$ROOT/tests
source scripts/env.sh
mkdir -p .cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, transformers, cffi; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'cffi', cffi.__version__, 'gpu', torch.cuda.get_device_name())" || exit 1

section "build libthaw (C + CUDA)"
nvcc --version | tail -1
timeout 240 $PY setup.py build_ext --inplace -q || exit 1
test -f thaw_format/libthaw_cuda.so || { echo "libthaw_cuda.so was not built"; exit 1; }

section "GPU tests"
timeout 200 $PY -m pytest -q -rs tests/libthaw/test_cuda.py tests/libthaw/test_stage_plan.py
tests_libthaw=$?
timeout 200 $PY -m pytest -q -rs -p no:cacheprovider tests/transformers/test_gpu.py tests/transformers/test_bench_gpu.py
tests_transformers=$?

section "benchmark"
timeout 200 $PY benchmarks/bench_gpu.py --name gpu_h200 --ring 4x16 --ring 8x16 --ring 8x64
bench=$?
[ -n "${OUT:-}" ] && cp benchmarks/results/gpu_h200.json benchmarks/results/gpu_h200.md "$OUT"/ 2>/dev/null

section "done: libthaw tests rc=$tests_libthaw, transformers tests rc=$tests_transformers, benchmark rc=$bench"
[ $tests_libthaw -eq 0 ] && [ $tests_transformers -eq 0 ] && [ $bench -eq 0 ]
