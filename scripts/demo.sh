#!/usr/bin/env bash
# One command from a fresh clone to the demo report: installs, then runs `headwater demo`.
# Usage: bash scripts/demo.sh [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
headwater demo "$@"
