#!/usr/bin/env bash
# Install kronfluence (the [peers] extra) beside the pinned CPU torch without letting pip
# replace torch: kronfluence declares torchvision, which it does not need to run.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python -m pip install -q --no-deps "kronfluence==1.0.1"
python -m pip install -q "accelerate>=0.31" "einops>=0.8" "einconv>=0.1" "opt-einsum>=3.3" "psutil>=5"
python -c "import kronfluence, torch; print('kronfluence', kronfluence.__version__, 'torch', torch.__version__)"
