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
# pip is not quieted: it shows what it downloads and installs (with bars on a terminal); each long
# step is announced with what it does and about how long it takes.
PIP=".venv/bin/python -m pip --disable-pip-version-check"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: [1/2] installing PyTorch ($TORCH_SPEC): about 200 MB for the CPU build, 1-3 minutes"
  echo "       (a CUDA build is several GB: 5-15 minutes)"
  $PIP install $TORCH_SPEC
fi
echo "setup: [2/2] installing keel and its dependencies (transformers, onnxruntime, ...): 1-2 minutes the first time"
$PIP install -e ".[test]"
.venv/bin/python -c "import torch, keel; print(f'setup: keel {keel.__version__}, torch {torch.__version__}')"
echo "setup: done. Put keel (and torchrun) on your PATH in this shell with: source .venv/bin/activate"

if [ "${1:-}" = "demo" ]; then
  shift
  exec .venv/bin/keel demo "$@"
fi
