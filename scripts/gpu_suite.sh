#!/usr/bin/env bash
# The project's GPU checks in one command (kangaroo_lit/bench/gpu_suite.py says what each stage does):
#
#   KANGAROO_REVISION=<sha> bash scripts/gpu_suite.sh OUT   # one H100/H200, no network: budget 8 min
#   bash scripts/gpu_suite.sh OUT --dry-run                 # the same stages, tiny shapes on the CPU (the tests)
#
# OUT receives five flat files and nothing else: gpu_report.json, gpu_report.md, gpu_rows.jsonl (each
# finished measurement, appended as it comes), gpu_suite.log and gpu_suite.tar.gz (the run directory
# without checkpoints, caches and weights). They are written as the suite goes and packed when it ends or
# is cut (SIGTERM, SIGINT, --budget_s), so a run cut short still returns what it measured. The work itself
# happens in a fresh run directory under --work_dir (default: $TMPDIR/kangaroo_gpu_suite). Exit 0 when
# every stage ran and passed, 128 + N when stopped by signal N, else 1.
#
# The revision: --revision, else $KANGAROO_REVISION, else `git rev-parse HEAD` here (the GPU machine gets
# the tree without .git: pass KANGAROO_REVISION there). Wheels the GPU image lacks (deepspeed, jsonargparse,
# ...): run `bash ../shared/gpu/fetch-wheels.sh` here first; when .whl/ holds them and the interpreter
# cannot import them, this script installs them into /tmp/site (no index, no network) before it starts.
# Other options after OUT: --only STAGE..., --budget_s SECONDS (default 480), --work_dir DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/gpu_suite.sh OUT [--dry-run] [--only STAGE ...] [--budget_s S] [--work_dir DIR] [--revision SHA]" >&2
  exit 2
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -z "${KANGAROO_REVISION:-}" ] && rev=$(git rev-parse HEAD 2>/dev/null); then
  # the same "<sha>[-dirty]" as the benchmarks' own git_revision
  if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then rev="$rev-dirty"; fi
  export KANGAROO_REVISION=$rev
fi
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import deepspeed, jsonargparse, docstring_parser" 2>/dev/null; then
  echo "installing the wheels in .whl/ into /tmp/site" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# This checkout's package (the GPU machine has it as files, not installed); nothing goes online.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# exec: the signals sent to this script (a timeout's SIGTERM, Ctrl-C) reach the suite, which then packs.
exec "$PY" -m kangaroo_lit.bench.gpu_suite "$@"
