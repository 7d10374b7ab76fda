#!/usr/bin/env bash
# issue 16: one prepared check of the GPU/TensorRT half for a lent GPU machine (see gpu_check.py for the plan).
#   benchmarks/gpu_check.sh --dry-run     the plan only (runs anywhere, no GPU needed)
#   benchmarks/gpu_check.sh               run what this machine allows; writes benchmarks/results/gpu_check.json
# Runs from a plain checkout with the machine's python3 (no venv: the lent image has torch, onnx, onnxruntime,
# click, rich, safetensors, psutil, pillow); tledge is imported from the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3)}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
# libcudart for tledge_runtime's ctypes layer: the CUDA toolkit's, or the one pip's nvidia-* wheels carry
extra=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib; do [ -d "$d" ] && extra="$extra:$d"; done
site=$("$PY" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)
for s in $site; do for d in "$s"/nvidia/*/lib "$s"/nvidia/cu*/lib; do [ -d "$d" ] && extra="$extra:$d"; done; done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}${extra}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
