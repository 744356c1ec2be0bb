#!/usr/bin/env bash
# The one-GPU check, in under 8 minutes: the CUDA tests, then the GPU benchmarks, as JSON.
#
#   bash benchmarks/gpu_check.sh [--smoke] [--out DIR]
#
# DIR (default benchmarks/out/gpu_check) receives cuda_tests.txt and gpu_bench.json. --smoke runs
# the same steps on the CPU in a minute (tests/test_gpu_check.py), so the script works the first
# time a GPU appears. On a machine without brics' dependencies, wheels placed in .whl/ are
# installed first (pip install --no-deps --no-index .whl/*.whl).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
OUT=benchmarks/out/gpu_check
SMOKE=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=(--smoke) ;;
    --out) OUT=$2; shift ;;
    *) echo "usage: $0 [--smoke] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then "$PY" -m pip install -q --no-deps --no-index .whl/*.whl; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
echo "== CUDA tests" >&2
timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt"
echo "== GPU benchmarks" >&2
timeout 330 "$PY" benchmarks/gpu_bench.py "${SMOKE[@]}" --out "$OUT/gpu_bench.json" > "$OUT/gpu_bench.log"
tail -n 4 "$OUT/gpu_bench.log" >&2
echo "wrote $OUT/gpu_bench.json" >&2
