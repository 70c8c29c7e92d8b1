#!/usr/bin/env bash
# Create .venv (if missing) and install headwater with the pinned CPU build of PyTorch.
# Usage: bash scripts/setup.sh [extra]     e.g. bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU wheel: a bare "torch" requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
if [ -n "$extra" ]; then
  python -m pip install -q -e ".[$extra]"
else
  python -m pip install -q -e .
fi
