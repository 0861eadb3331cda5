#!/usr/bin/env bash
# Set up a fresh machine and run the course end to end on the shipped model (CPU is enough).
#   bash scripts/setup.sh            # creates .venv, installs kvcourse[triton,dev], runs the quickstart
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU wheel of torch unless a CUDA machine asks otherwise (KVCOURSE_TORCH="torch" to let pip choose)
python -m pip install -q "${KVCOURSE_TORCH:-torch}" --index-url "${KVCOURSE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" \
  || python -m pip install -q torch
python -m pip install -q -e ".[triton,dev]"
python -m ipykernel install --user --name kvcourse --display-name "kvcourse" >/dev/null
python -m refimpl.check_env || true
python scripts/quickstart.py
