#!/usr/bin/env bash
# GPU validation kit (issue 17): proves the CUDA paths and measures speed in one command, at most 8 minutes on one
# H100/H200. Prints one summary table at the end and writes it, as JSON and text, to the folder given (default
# $OUT, else runs/gpu_check), with the full console log. The logic is benchmarks/gpu_check.py (the driver) and
# its parts, benchmarks/gpu_check_{common,correctness,distributed}.py.
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine ($OUT set by the device tool)
#   bash benchmarks/gpu_check.sh runs/gpu_check --only correctness distributed   # a second, shorter try
#   bash benchmarks/gpu_check.sh runs/gpu_check_cpu --device cpu --quick           # the same paths on a CPU
#
# Needs packed_data/cifar10.npz (python benchmarks/pack_cifar10.py) for the data and convergence parts;
# benchmarks/README.md gives the device tool's command and carry list.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=${OUT:-runs/gpu_check}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then DEST=$1; shift; fi
if [ -z "${PYTHON:-}" ]; then
    # the project's venv where it exists and runs (here); the machine's python3 elsewhere (the GPU machine)
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PYTHON=.venv/bin/python;
    else PYTHON=python3; fi
fi
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
"$PYTHON" benchmarks/gpu_check.py --out "$DEST" "$@" 2>&1 | tee "$DEST/gpu_check.log"
exit "${PIPESTATUS[0]}"
