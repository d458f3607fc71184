#!/usr/bin/env bash
# The project's GPU checks in one command (kangaroo_lit/bench/gpu_suite.py says what each stage does):
#
#   bash scripts/gpu_suite.sh OUT             # one H100/H200, torch 2.11, transformers 5.17, no network: ~7 min
#   bash scripts/gpu_suite.sh OUT --dry-run   # the same stages with tiny shapes on the CPU (the tests run it)
#
# Writes OUT/gpu_report.json and OUT/gpu_report.md (and each benchmark's own files under OUT/bench);
# exits 0 when every stage passed. Wheels the GPU image lacks (deepspeed, jsonargparse, ...): run
# `bash ../shared/gpu/fetch-wheels.sh` here first; when .whl/ holds them and the interpreter cannot
# import them, this script installs them into /tmp/site (no index, no network) before it starts.
# Other options after OUT: --only STAGE..., --budget_s SECONDS (default 480).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/gpu_suite.sh OUT [--dry-run] [--only STAGE ...] [--budget_s S]" >&2
  exit 2
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import deepspeed, jsonargparse, docstring_parser" 2>/dev/null; then
  echo "installing the wheels in .whl/ into /tmp/site" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# This checkout's package (the GPU machine has it as files, not installed); nothing goes online.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m kangaroo_lit.bench.gpu_suite "$@"
