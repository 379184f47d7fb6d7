#!/usr/bin/env bash
# The GPU check: on a CUDA machine, set up if needed, then run the pipeline on the GPU with the tiny
# profile and the default one, stage by stage, and print one table (per-stage seconds and device,
# teacher and student accuracy, images/s of training and of the statistics pass).
# Results: bench/results/gpu_check.json and .md (or the path given). Fails loudly without CUDA.
#
#   bench/gpu_check.sh [OUT.json]
#
# Set-up: by default the project's .venv (`make`, needs the package index). On a machine where the
# dependencies are already importable by another interpreter (no network), point CDC_PYTHON at it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu_check.json}

if [ -n "${CDC_PYTHON:-}" ]; then
  PY=$CDC_PYTHON
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  make --no-print-directory data
else
  make --no-print-directory .venv/bin/cdc data
  PY=.venv/bin/python
fi

"$PY" - <<'PYCHECK'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"FAIL: CUDA is not available to {sys.executable} (torch {torch.__version__}, "
             f"CUDA build {torch.version.cuda}); this check needs a GPU")
print(f"CUDA ok: {torch.cuda.get_device_name()} (torch {torch.__version__})")
PYCHECK

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
"$PY" -m pytest -q -m gpu tests/test_device.py   # mixed precision, device-side sums, CPU-loadable checkpoints
# the performance figures on the GPU (bench/results/*_cuda.json): statistics pass vs inference, student speed-up
"$PY" -m bench.stats_overhead --device cuda
"$PY" -m bench.student_speedup --device cuda --forms eager folded folded_channels_last --rounds 20
# the latency table's prediction on the GPU (batch sizes where a GPU serves): latency_table_cuda.json
"$PY" -m bench.latency_table --device cuda --batch-sizes 64 256 --repeats 2
exec "$PY" bench/gpu_check.py --out "$OUT"
