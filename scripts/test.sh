#!/usr/bin/env bash
# One command from a fresh clone to a full test run: installs what the tests need
# (including headless Chromium for the report test), lints, and runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
ruff check src tests benchmarks scripts
ruff format --check src tests benchmarks scripts
lint-imports --no-cache   # the layer contract and no import cycles (pyproject.toml [tool.importlinter])
python -m pytest "$@"
