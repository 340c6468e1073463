#!/usr/bin/env bash
# Set up keel on a fresh machine: a virtual environment in .venv with PyTorch and keel's
# dependencies. Safe to run again; it only installs what is missing.
#   ./setup.sh            set up
#   ./setup.sh demo       set up, then run `keel demo`
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# PyTorch comes first and pinned, so that nothing later pulls a multi-GB build on its own.
# On these machines the pin resolves to the CPU build; point TORCH_SPEC elsewhere on an accelerator
# host (e.g. TORCH_SPEC="torch torch_npu" for Ascend).
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing PyTorch ($TORCH_SPEC)"
  $PIP install $TORCH_SPEC
fi
echo "setup: installing keel and its dependencies"
$PIP install -e ".[test]"
.venv/bin/python -c "import torch, keel; print(f'setup: keel {keel.__version__}, torch {torch.__version__}')"

if [ "${1:-}" = "demo" ]; then
  shift
  exec .venv/bin/keel demo "$@"
fi
