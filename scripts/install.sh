#!/usr/bin/env bash
# Create .venv (if absent) and install kangaroo_lit with pinned dependencies, offline-friendly.
#
#   bash scripts/install.sh            # CPU machine: torch==2.13.0 CPU build
#   KANGAROO_TORCH=skip bash scripts/install.sh   # keep the torch already in the venv (e.g. a CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on machines without one.
if [ "${KANGAROO_TORCH:-}" != "skip" ]; then
  "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -e ".[dev]"
# DeepSpeed ships as an sdist whose setup.py imports torch, so it must build against the torch above
# (build isolation would fetch another torch). Its CUDA ops are JIT-compiled on first use on a GPU.
DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation "deepspeed==0.19.8"
echo "kangaroo_lit installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
