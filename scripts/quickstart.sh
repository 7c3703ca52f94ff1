#!/usr/bin/env bash
# The offline quickstart: installs xfer, then runs the whole study in sweeps/quickstart.yaml on CPU
# (source training, grid, final stage, report) with local Ray and MLflow in ./mlflow.db.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
exec xfer sweep sweeps/quickstart.yaml "$@"
