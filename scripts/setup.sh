#!/usr/bin/env bash
# Create .venv with fastllava and its test dependencies. The pinned CPU torch is installed first
# so that no several-GB CUDA build gets pulled in; on a GPU machine install your CUDA torch first.
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
.venv/bin/python -m pip install -q -c .venv/constraints.txt -e ".[dev]"
