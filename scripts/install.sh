#!/usr/bin/env bash
# Creates ./.venv and installs xfer into it (idempotent). Pins torch for this platform: pip takes
# torch 2.14.1 / torchvision 0.29.1 from the local wheel cache; pyproject keeps open ranges for users.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_PIN=${XFER_TORCH_PIN:-"torch==2.14.1 torchvision==0.29.1"}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, torchvision" 2>/dev/null; then
  echo "==> installing $TORCH_PIN (a few minutes the first time)"
  pip install -q $TORCH_PIN 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  python -c "import torch, torchvision" || { echo "torch install failed" >&2; exit 1; }
fi
echo "==> installing xfer and its dependencies"
if ! pip install -q -e ".[dev]" >.venv/pip-install.log 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" .venv/pip-install.log >&2
  echo "pip install failed (full log: .venv/pip-install.log)" >&2
  exit 1
fi
python -c "import xfer, torch, ray, mlflow, timm" || { echo "install failed"; exit 1; }
