#!/usr/bin/env bash
# Run the model and decoding tests against the lowest versions setup.cfg accepts for the Hugging Face
# stack: transformers 5.17.0 (with the lowest tokenizers it accepts, 0.23.1) and peft 0.21.0, the
# versions of the GPU image. They are side-installed into .venv-lowest/ (git-ignored) and put first on
# PYTHONPATH; everything else comes from .venv (run scripts/install.sh first). Re-runs reuse the folder.
#
#   bash scripts/test_lowest.sh                  # the model/decoding test modules (trees too)
#   bash scripts/test_lowest.sh -x -k greedy     # extra arguments go to pytest
#
# transformers 5.17 needs huggingface_hub<2 (.venv has 2.x for the newer transformers), and
# huggingface_hub 1.x talks HTTP through httpx rather than httpx2, hence the extra pins below.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=.venv-lowest
PY=.venv/bin/python
PINS=(
  transformers==5.17.0
  tokenizers==0.23.1
  peft==0.21.0
  huggingface_hub==1.33.0
  httpx==0.28.1
  httpcore==1.0.9
  certifi==2026.10.19.post1
)
STAMP="$TARGET/.pins"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "${PINS[*]}" ]; then
  rm -rf "$TARGET"
  # --no-deps: every other dependency (torch above all) is the one .venv already has.
  "$PY" -m pip install --disable-pip-version-check -q --no-deps --target "$TARGET" "${PINS[@]}"
  echo "${PINS[*]}" >"$STAMP"
fi

# The versions are checked inside the pytest run itself (a plugin, so that nothing is imported before
# pytest starts): a mismatch stops it with exit status 3. transformers also checks the versions of its
# own dependencies when imported.
PYTHONPATH="$PWD/$TARGET${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$@" <<'PY'
import importlib.metadata as md
import os
import sys

import pytest

TARGET = os.path.abspath(".venv-lowest")
EXPECTED = {"transformers": "5.17.0", "tokenizers": "0.23.1", "peft": "0.21.0", "huggingface_hub": "1.33.0"}
TESTS = ["tests/test_model.py", "tests/test_attention_backends.py", "tests/test_decoding_greedy.py",
         "tests/test_decoding_units.py", "tests/test_decoding_sampling.py", "tests/test_tree.py",
         "tests/test_lora_merge.py"]


class LowestVersions:
    def pytest_sessionstart(self, session):
        import huggingface_hub
        import peft
        import tokenizers
        import transformers

        found = {name: md.version(name) for name in EXPECTED}
        wrong = {name: found[name] for name in EXPECTED if found[name] != EXPECTED[name]}
        if transformers.__version__ != EXPECTED["transformers"]:
            wrong["transformers.__version__"] = transformers.__version__
        for module in (transformers, tokenizers, peft, huggingface_hub):
            if not os.path.abspath(module.__file__).startswith(TARGET + os.sep):
                wrong[module.__name__] = f"imported from {module.__file__}"
        if wrong:
            pytest.exit(f"test_lowest: not the lowest versions: {wrong} (expected {EXPECTED})", returncode=3)

    def pytest_report_header(self, config):
        return "test_lowest: " + ", ".join(f"{name} {md.version(name)}" for name in EXPECTED)


sys.exit(pytest.main([*TESTS, *sys.argv[1:]], plugins=[LowestVersions()]))
PY
