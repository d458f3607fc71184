#!/usr/bin/env bash
# Create .venv (if absent) and install kangaroo_lit with the exact versions of constraints.txt (CI does
# the same). Safe to re-run. Needs a package index (PyPI); nothing here reaches the Hugging Face Hub.
#
#   bash scripts/install.sh            # CPU machine: torch==2.13.0 CPU build
#   KANGAROO_TORCH=skip bash scripts/install.sh   # keep the torch already in the venv (e.g. a CUDA build):
#                                                 # constraints.txt is used without its torch line
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

CONSTRAINTS=constraints.txt
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on machines without one.
if [ "${KANGAROO_TORCH:-}" != "skip" ]; then
  "${PIP[@]}" "torch==2.13.0"
else
  CONSTRAINTS=$(mktemp)
  trap 'rm -f "$CONSTRAINTS"' EXIT
  grep -v '^torch==' constraints.txt >"$CONSTRAINTS"
fi
"${PIP[@]}" -c "$CONSTRAINTS" -e ".[dev]"
# DeepSpeed ships as an sdist whose setup.py imports torch when it can: built without isolation it sees
# the torch above and records it. Its CUDA ops are JIT-compiled on first use on a GPU.
DS_BUILD_OPS=0 "${PIP[@]}" -c "$CONSTRAINTS" --no-build-isolation deepspeed
echo "kangaroo_lit installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
