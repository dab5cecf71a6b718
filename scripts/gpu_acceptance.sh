#!/usr/bin/env bash
# GPU acceptance in one command (issue 19): at most 10 minutes on one GPU, one JSON on stdout, the same JSON in
# results/gpu/acceptance-<gpu>-<date>.json. Exit 0: every section passed; 1: a section failed (see its entry);
# 2: no GPU here (one line, nothing run).
#
#   scripts/gpu_acceptance.sh                 # uses .venv/bin/python if present, else python3
#   PYTHON=/path/to/python scripts/gpu_acceptance.sh --quick
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$PYTHON" -c "import torch, whisfusion_cli" 2>/dev/null; then
  echo "gpu_acceptance: $PYTHON cannot import torch and whisfusion_cli; install the project or set PYTHON=" >&2
  exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)"; then
  echo "gpu_acceptance: no CUDA GPU is available to torch on this machine; nothing was run" >&2
  exit 2
fi
gpu="$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")"
out="results/gpu/acceptance-${gpu}-$(date -u +%Y%m%dT%H%M%SZ).json"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=INT --kill-after=20 590 "$PYTHON" scripts/gpu_acceptance.py --out "$out" "$@"
