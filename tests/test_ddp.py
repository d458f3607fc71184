"""Two CPU processes (``strategy: ddp``, gloo) train, checkpoint and resume like one.

The 2-process runs happen in one subprocess, ``tests/ddp_scripts/fit_ddp.py``: under ``ddp`` Lightning
starts rank 1 by re-running the command that started rank 0, so it cannot be the pytest command.
That script runs four fits through the real CLI (``kangaroo_lit.cli.main``, the embedded config
``configs/tiny.yaml`` with the tiny test model and data substituted) and a recording callback
(``tests/ddp_scripts/recorder.py``) writes, per rank, every micro-batch's rows, loss and learning rate
and the trainable weights at the end. The 1-process references run in this process.

**How the loss is normalised, and why the comparison is exact.** The loss of a micro-batch is a token
mean (``sgp_loss``: mean over its target tokens). With gradient accumulation Lightning divides each
micro-batch's loss by ``accumulate_grad_batches`` before ``backward``, so one process accumulating two
micro-batches steps on ``(g0 + g1) / 2``; under DDP each rank back-propagates its own micro-batch and
DDP all-reduces the gradients as a mean over ranks, so two processes also step on ``(g0 + g1) / 2``.
Both are the mean of the micro-batches' token means, which is the token mean of the global batch only
when every micro-batch holds as many target tokens; the data here makes that so (every row is exactly
24 tokens, all targets), so 1 process x batch 2 x accumulation 2, 2 processes x batch 2 and 1 process
x batch 4 all optimise the same objective. The data module's sampler cuts the same global batch list
for every process count and deals batch ``k`` to rank ``k % 2``, so step ``s`` of the 2-process run
sees exactly micro-batches ``2s`` and ``2s + 1`` of the 1-process run.

Tolerances (fp32 on CPU, LoRA dropout 0): the first step's losses agree to 1e-6 relative (same weights,
same rows, same arithmetic); later losses to 1e-5 relative and the trainable weights after the epoch
(9 AdamW steps at lr 1e-2) to 1e-5 relative + 1e-6 absolute: the only difference is the order in which
``g0 / 2`` and ``g1 / 2`` are summed, a rounding error in the last bit that Adam's division by
``sqrt(v)`` can magnify for near-zero gradients. The two ranks' weights must be bitwise equal.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from kangaroo_lit.cli import run_lightning
from kangaroo_lit.data.sampler import LengthGroupedBatchSampler
from tests.conftest import REPO_ROOT
from tests.ddp_scripts.fit_ddp import common_args, recorded

ROWS, ROW_TOKENS = 40, 24  # 4 validation rows (val_fraction 0.1), 36 training rows = 18 batches of 2
STEPS_PER_EPOCH = 9
SCRIPT = REPO_ROOT / "tests" / "ddp_scripts" / "fit_ddp.py"


def equal_length_texts(tokenizer, n: int, length: int, seed: int = 0) -> list[str]:
    """``n`` distinct texts that the data module turns into exactly ``length`` tokens each (BOS..EOS)."""
    from kangaroo_lit.data.tokenize import RowEncoder

    encoder = RowEncoder(tokenizer, 4 * length, "text", False)
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
    rng, texts = random.Random(seed), []
    while len(texts) < n:
        text = f"row {len(texts)}:"
        while len(ids := encoder.encode_rows([{"text": text}])[0][0].ids) < length:
            text += " " + rng.choice(words)
        if len(ids) == length and text not in texts:
            texts.append(text)
    return texts


def load_records(folder):
    records = {}
    for path in sorted(folder.glob("record.rank*.json")):
        data = json.loads(path.read_text())
        weights = torch.load(path.with_name(f"weights.rank{data['rank']}.pt"), weights_only=True)
        records[data["rank"]] = SimpleNamespace(**data, weights=weights)
    return records


def batches(record) -> list[dict]:
    """The record's micro-batches in training order."""
    key = lambda k: tuple(int(x) for x in k.split(":"))  # noqa: E731
    return [record.batches[k] for k in sorted(record.batches, key=key)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir, one_thread):
    """The 1-process references (in this process) and the 2-process script's four fits."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("ddp")
    data = root / "rows.jsonl"
    texts = equal_length_texts(AutoTokenizer.from_pretrained(tiny_llama_dir), ROWS, ROW_TOKENS)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    base = ["fit", *common_args(str(tiny_llama_dir), str(data), str(root / "cache")), "--trainer.devices", "1",
            "--model.lora.dropout", "0", "--trainer.max_epochs", "1"]

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.addHandler(handler)
    try:
        # 1 process x batch 2 x accumulation 2 (the same global batch as 2 processes x batch 2) ...
        run_lightning([*base, "--trainer.accumulate_grad_batches", "2",
                       "--trainer.default_root_dir", str(root / "runs" / "ref"), *recorded(root, "ref")])
        # ... and 1 process x batch 4 (the schedule's step count only)
        run_lightning([*base, "--data.batch_size", "4", "--trainer.limit_val_batches", "0",
                       "--trainer.default_root_dir", str(root / "runs" / "ref4"), *recorded(root, "ref4")])
    finally:
        lightning_log.removeHandler(handler)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KANGAROO_DDP_MODEL": str(tiny_llama_dir),
           "KANGAROO_DDP_DATA": str(data), "KANGAROO_DDP_OUT": str(root)}
    for name in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "SLURM_NTASKS"):
        env.pop(name, None)  # Lightning's own launcher must start rank 1, on a free port
    start, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=420)
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return SimpleNamespace(root=root, data=data, texts=texts, output=output, seconds=seconds, cpu_seconds=cpu_seconds,
                           ref_log="\n".join(messages),
                           **{name: load_records(root / name) for name in ("ref", "ref4", "u0", "u", "c", "r", "s")})


def test_two_processes_train_like_one_at_the_same_global_batch(runs):
    """(a) 2 processes x batch 2 == 1 process x batch 2 x accumulation 2: rows, losses, LR, weights."""
    ref, two = batches(runs.ref[0]), [batches(runs.u0[rank]) for rank in (0, 1)]
    assert len(ref) == 2 * STEPS_PER_EPOCH and len(two[0]) == len(two[1]) == STEPS_PER_EPOCH
    for step in range(STEPS_PER_EPOCH):
        for rank in (0, 1):
            mine, theirs = two[rank][step], ref[2 * step + rank]
            assert mine["rows"] == theirs["rows"], (step, rank)
            rel = 1e-6 if step == 0 else 1e-5
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=rel), (step, rank)
            assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-12), (step, rank)
    assert all(len(row) == ROW_TOKENS for b in ref for row in b["rows"])  # equal token counts, as assumed
    w0, w1, w_ref = runs.u0[0].weights, runs.u0[1].weights, runs.ref[0].weights
    assert w0.keys() == w1.keys() == w_ref.keys() and len(w0) > 0
    for name in w0:
        assert torch.equal(w0[name], w1[name]), f"ranks disagree on {name}"
        torch.testing.assert_close(w0[name], w_ref[name], rtol=1e-5, atol=1e-6, msg=name)
    # trained at all: the weights moved away from the start (LoRA B starts at zero)
    assert any(w.abs().sum() > 0 for n, w in w0.items() if "lora_B" in n)


def test_length_grouped_sampler_shards_without_overlap_or_loss():
    """(b) num_replicas=2: equal, disjoint shares covering every batch; odd counts padded by repetition."""
    rng = random.Random(0)
    lengths = [rng.randint(4, 60) for _ in range(38)]
    for n_items, epoch in ((36, 0), (37, 1), (38, 2)):  # 18 batches, 19 (odd: one repeated), 19
        single = LengthGroupedBatchSampler(lengths[:n_items], 2, seed=5)
        single.set_epoch(epoch)
        everything = list(single)
        shares = []
        for rank in (0, 1):
            sampler = LengthGroupedBatchSampler(lengths[:n_items], 2, seed=5, num_replicas=2, rank=rank)
            sampler.set_epoch(epoch)
            shares.append(list(sampler))
            assert len(shares[rank]) == len(sampler) == -(-len(everything) // 2)
            assert shares[rank] == everything[rank::2] + ([everything[0]] if rank and len(everything) % 2 else [])
        flat = [i for share in shares for b in share for i in b]
        repeated = len(flat) - n_items
        assert sorted(set(flat)) == list(range(n_items))  # nothing lost
        assert repeated == (len(everything[0]) if len(everything) % 2 else 0)  # only the padding batch twice
        # a resumed epoch (k batches done on each rank) yields exactly the rest of each share
        for rank in (0, 1):
            sampler = LengthGroupedBatchSampler(lengths[:n_items], 2, seed=5, num_replicas=2, rank=rank)
            sampler.set_epoch(epoch)
            sampler.set_start_batch(3)
            assert list(sampler) == shares[rank][3:]


def test_real_two_process_run_saw_every_training_row_once(runs):
    """(b) The rows each rank actually trained on in one epoch: disjoint, and together all training rows."""
    seen = [[tuple(row) for b in batches(runs.u0[rank]) for row in b["rows"]] for rank in (0, 1)]
    assert not set(seen[0]) & set(seen[1])
    trained = seen[0] + seen[1]
    assert len(trained) == len(set(trained)) == ROWS - 4  # every training row once (4 are validation rows)
    assert set(trained) == {tuple(row) for b in batches(runs.ref[0]) for row in b["rows"]}


def test_two_process_mid_epoch_resume_is_exact(runs):
    """(c) crash at step 5 (last.ckpt at step 4), resume: the same batches, losses and weights as straight."""
    assert torch.load(runs.root / "runs" / "c" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    for rank in (0, 1):
        straight, crashed, resumed = runs.u[rank], runs.c[rank], runs.r[rank]
        assert resumed.start_step == 4 and straight.start_step == 0
        combined = {**crashed.batches, **resumed.batches}  # the resumed run redoes step 5's batch
        assert sorted(resumed.batches) == ["0:4", "0:5"]
        assert combined.keys() == straight.batches.keys() and len(straight.batches) == 6
        for key, expected in straight.batches.items():
            assert combined[key]["rows"] == expected["rows"], (rank, key)
            # LoRA dropout 0.1: equal losses need the restored RNG state too
            assert combined[key]["loss"] == pytest.approx(expected["loss"], rel=1e-6, abs=1e-7), (rank, key)
        for name, weight in straight.weights.items():
            torch.testing.assert_close(resumed.weights[name], weight, rtol=1e-6, atol=1e-7, msg=name)
    assert batches(runs.u[0])[4]["rows"] != batches(runs.u[1])[4]["rows"]  # the ranks' shares differ


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(runs):
    """SIGTERM to rank 1 alone after step 3: the stop is decided across ranks (GracefulStop reduces it), so
    both ranks end after step 3 (none waits forever in the next step's all-reduce) and last.ckpt holds it."""
    for rank in (0, 1):
        assert max(b["step_after"] for b in runs.s[rank].batches.values()) == 3, rank
    assert torch.load(runs.root / "runs" / "s" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert "stopped by SIGTERM after step 3" in runs.output


def test_logs_state_global_batch_accumulation_and_steps(runs):
    """(d) Logged once on rank 0; the schedule's step count is the same for 1x4, 1x2x2 and 2x2."""
    line = ("global batch 4 rows per optimizer step = 2 per process x 2 process(es) x 1 accumulation step(s); "
            f"{STEPS_PER_EPOCH} optimizer steps in this run's schedule (from step 0)")
    assert runs.output.count(line) == 1  # rank 0 only
    assert "= 2 per process x 1 process(es) x 2 accumulation step(s); 9 optimizer steps" in runs.ref_log
    assert "global batch 4 rows per optimizer step = 4 per process x 1 process(es) x 1" in runs.ref_log
    steps = {name: getattr(runs, name)[0].estimated_stepping_batches for name in ("ref", "ref4", "u0")}
    assert steps == {"ref": STEPS_PER_EPOCH, "ref4": STEPS_PER_EPOCH, "u0": STEPS_PER_EPOCH}
    assert runs.u0[1].estimated_stepping_batches == STEPS_PER_EPOCH
    assert "from step 4" in runs.output  # the resumed run says where it picks up


def test_validation_metrics_are_synced_across_processes(runs):
    """val/loss (torchmetrics MeanMetric, token-weighted, synced on compute) == the 1-process figure."""
    ref, rank0, rank1 = runs.ref[0].val, runs.u0[0].val, runs.u0[1].val
    assert "val/loss" in ref and set(ref) <= set(rank0)  # (the 2-process run also has the decode check's)
    for name in ref:
        assert rank0[name] == rank1[name], name
        assert rank0[name] == pytest.approx(ref[name], rel=1e-5), name


def test_rank_zero_files_and_decode_checks_under_two_processes(runs):
    """run_info.json (its hook asks every rank for the log directory: no hang) and the decode callback's
    metrics, which rank 0 logs after every rank decoded."""
    run_dir = runs.root / "runs" / "u0"
    assert len(list(run_dir.rglob("run_info.json"))) == 1
    metrics = next(run_dir.rglob("metrics.csv")).read_text()
    assert "val/mat" in metrics and "val/loss" in metrics
    assert not list(run_dir.rglob("predictions*.jsonl"))
    print(f"2-process script: {runs.seconds:.1f} s wall, {runs.cpu_seconds:.1f} s CPU")


def test_run_info_asks_every_rank_for_the_log_directory(tmp_path):
    """The hang of #1 without a second process: rank 1 must take part in ``Trainer.log_dir`` (a broadcast)
    and write nothing; rank 0 writes."""
    from kangaroo_lit.run_info import RunInfoCallback

    class FakeTrainer:
        def __init__(self, rank):
            self.is_global_zero, self.default_root_dir, self.asked = rank == 0, str(tmp_path), 0

        @property
        def log_dir(self):
            self.asked += 1
            return str(tmp_path / "logs")

    callback = RunInfoCallback()
    other, zero = FakeTrainer(1), FakeTrainer(0)
    callback.on_fit_start(other, None)
    assert other.asked == 1 and not (tmp_path / "logs").exists()
    callback.on_fit_start(zero, None)
    assert zero.asked == 1 and (tmp_path / "logs" / "run_info.json").is_file()
