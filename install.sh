#!/usr/bin/env bash
# Install whisfusion into the current Python environment.
#   bash install.sh          the tool
#   bash install.sh --test   the tool + test dependencies (what CI runs)
# torch is installed first and pinned: where no NVIDIA GPU is present we take the CPU build, because a
# bare `torch` requirement on Linux pulls a multi-GB CUDA build. Set WHISFUSION_TORCH to override the spec.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${WHISFUSION_TORCH:-torch==2.13.0}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install "$TORCH_SPEC"
  else
    # The official CPU wheel index first; where it is unreachable (offline mirrors), the default index.
    "$PY" -m pip install "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu --retries 0 --timeout 10 2>/dev/null \
      || "$PY" -m pip install "$TORCH_SPEC"
  fi
fi
"$PY" -m pip install -e ".${extras}"
# The tests read our JSON with openai-whisper's own writers; its dependencies are in the test extra, all but
# triton (a GPU compiler whisper.utils never imports), hence --no-deps.
if [ -n "$extras" ]; then "$PY" -m pip install --no-deps "openai-whisper==20250625"; fi
# pyenv only puts new console scripts (whisfusion) on PATH after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
