"""The decode check's reduction under two real gloo processes (tests/ddp_scripts/decode_check.py): each rank
decodes its share of the prompts, and ``compute()`` gives every rank the figures of one process decoding all.

Marked slow (run it with ``-m slow``); the default run checks the same sharding and sums with a fake world size
in one process (tests/test_decode_check.py::test_sharded_counters_sum_to_the_one_process_figures)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from kangaroo_lit.callbacks import DECODE_COUNTERS, decode_check_metrics, decode_figures, decode_prompts
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # ~40 s on a loaded 2-core runner, mostly three interpreters importing torch + lightning
def test_two_gloo_ranks_sum_to_one_process(tmp_path, tiny_llama_dir):
    sys.path.insert(0, str(REPO_ROOT / "tests" / "ddp_scripts"))
    try:
        from decode_check import KW, build
    finally:
        sys.path.pop(0)
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests/ddp_scripts/decode_check.py"), str(tiny_llama_dir),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    seconds = time.time() - start

    model, prompts = build(str(tiny_llama_dir))
    one = decode_check_metrics()
    with torch.no_grad():
        decode_prompts(model, prompts, one, **KW)
    single = {n: float(one[n].compute()) for n in DECODE_COUNTERS}
    assert ranks[0]["local"]["prompts"] == 3 and ranks[1]["local"]["prompts"] == 2  # prompts 0,2,4 / 1,3
    assert ranks[0]["totals"] == ranks[1]["totals"]  # every rank holds the synced figures
    for name in DECODE_COUNTERS:
        if not name.endswith("time_s"):
            assert ranks[0]["totals"][name] == single[name], name
        assert ranks[0]["totals"][name] == ranks[0]["local"][name] + ranks[1]["local"][name], name
    reference = decode_figures(single)
    assert reference["mat"] > 1.0  # drafts were accepted: the figures say something
    for name in ("mat", "accept_rate", "identical"):
        assert ranks[0]["figures"][name] == reference[name], name
    print(f"2-process decode check: {seconds:.1f} s")
