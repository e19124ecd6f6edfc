#!/usr/bin/env bash
# Create .venv with fastllava and its test dependencies (lmms-eval and Ray included: their tests
# run them). The pinned CPU torch is installed first so that no several-GB CUDA build gets pulled
# in; on a GPU machine install your CUDA torch (and its torchvision) first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
# keep the torch installed above (or yours): a bare `torch` requirement must not replace it
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" > .venv/constraints.txt
.venv/bin/python -m pip install -q -c .venv/constraints.txt -e ".[dev,lmms,ray]"
# lmms-eval requires torchvision, and pip takes PyPI's, built for another torch: it fails on import
# ("operator torchvision::nms does not exist") and breaks transformers, which imports it when it is
# there. fastllava and lmms-eval's image tasks do not need it: remove one that does not load.
if ! .venv/bin/python -c "import torchvision" 2>/dev/null; then
  .venv/bin/python -m pip uninstall -q -y torchvision 2>/dev/null || true
fi
