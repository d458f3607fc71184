"""Two gloo processes run the decode check's sharded decoding and its reduction (``compute()``, a collective).

    python tests/ddp_scripts/decode_check.py MODEL_DIR OUT_DIR

Each rank builds the same model (same seed), decodes the prompts ``i % 2 == rank`` into its SumMetrics and
writes ``rank<N>.json`` with the synced totals and the figures; the test compares them with one process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def build(model_dir: str):
    """The model and prompts both the test and the ranks use (seeded)."""
    from kangaroo_lit.settings import LoraSettings
    from tests.helpers import make_module

    torch.manual_seed(0)
    module = make_module(model_dir, lora=LoraSettings(rank=4, dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = module.model.adapter.self_attn.o_proj.weight
        w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
        for layer in module.model.layers[module.model.exit_layer + 1:]:  # deep layers add nothing: drafts accepted
            layer.mlp.down_proj.weight.mul_(0.1)
    prompts = [torch.randint(3, 300, (1, 4 + i), generator=gen) for i in range(5)]
    return module.model.eval(), prompts


KW = dict(max_new_tokens=8, eos_token_id=None, threshold=0.0, max_draft=3)


def worker(rank: int, model_dir: str, out: str, port: int) -> None:
    from kangaroo_lit.callbacks import decode_check_metrics, decode_figures, decode_prompts

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, prompts = build(model_dir)
    metrics = decode_check_metrics()
    with torch.no_grad():
        decode_prompts(model, prompts, metrics, rank=rank, world_size=2, **KW)
    local = {n: float(m.sum_value) for n, m in metrics.items()}  # this rank's own share, before the sync
    totals = {n: float(m.compute()) for n, m in metrics.items()}
    Path(out, f"rank{rank}.json").write_text(json.dumps({"local": local, "totals": totals,
                                                         "figures": decode_figures(totals)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    model_dir, out = sys.argv[1], sys.argv[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(model_dir, out, port), nprocs=2, join=True)
