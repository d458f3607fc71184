"""Lightning callbacks: prediction output, the decode check and drift report at validation time, throughput."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from kangaroo_lit.settings import DecodingSettings


class JsonlPredictionWriter(BasePredictionWriter):
    """Write ``predict`` results as JSON lines (one per prompt, in prompt order), each as soon as it is done.

    The file is emptied when a predict run writes its first result, and each later result is appended and
    flushed, so a run that stops halfway keeps every response decoded before. With several processes each
    writes its own file, ``<name>.rank<N>.jsonl``.

    Args:
        output_path: the file; default ``<default_root_dir>/predictions.jsonl``.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self._file = None
        self._path: Path | None = None
        self._mats: list[float] = []

    def path(self, trainer: L.Trainer) -> Path:
        """Where this process writes."""
        path = Path(self.output_path or os.path.join(trainer.default_root_dir, "predictions.jsonl"))
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        self._path = self.path(trainer)
        self._mats = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        rows = prediction if isinstance(prediction, list) else [prediction]
        if self._file is None:  # the first result of this run: start the file afresh
            path = self._path or self.path(trainer)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w")
        for row in rows:
            self._file.write(json.dumps(row) + "\n")
            self._mats.append(row["mat"])
        self._file.flush()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wrote = self._file is not None
        self._close()
        if wrote:
            mats = self._mats
            print(f"wrote {len(mats)} responses to {self._path} (mean MAT {sum(mats) / max(1, len(mats)):.2f})")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()  # what was written stays

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# The decode check's counters, summed over prompts (and over processes by ``compute()``).
DECODE_COUNTERS = ("prompts", "identical", "new_tokens", "passes", "drafted", "accepted", "spec_time_s",
                   "vanilla_new_tokens", "vanilla_time_s")


def decode_check_metrics() -> torch.nn.ModuleDict:
    """One ``torchmetrics.SumMetric`` per entry of :data:`DECODE_COUNTERS` (float64: exact counts, and
    sums of wall times that do not lose their small terms)."""
    from torchmetrics import SumMetric

    metrics = torch.nn.ModuleDict({name: SumMetric() for name in DECODE_COUNTERS})
    return metrics.to(torch.float64)


def shard(items: list, rank: int, world_size: int) -> list[tuple[int, Any]]:
    """``(i, item)`` for the items this process takes: item i goes to rank ``i % world_size``."""
    return [(i, item) for i, item in enumerate(items) if i % world_size == rank]


def decode_prompts(model, prompts: list[torch.Tensor], metrics: torch.nn.ModuleDict, *, max_new_tokens: int,
                   eos_token_id, threshold: float, max_draft: int, rank: int = 0, world_size: int = 1) -> None:
    """Decode this rank's share of ``prompts`` (greedy) self-speculatively and with the vanilla loop, and add
    the figures to ``metrics`` (:func:`decode_check_metrics`). ``model`` must be in eval mode.

    Every counter is updated at least once (with 0 on a rank without prompts), so every rank can take part
    in the synchronisation of ``compute()``.
    """
    from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder

    spec = SelfSpeculativeDecoder(model, threshold=threshold, max_draft=max_draft)
    vanilla = VanillaDecoder(model)
    device = metrics["prompts"].device
    for name in DECODE_COUNTERS:
        metrics[name].update(torch.zeros((), dtype=torch.float64, device=device))
    for _, ids in shard(prompts, rank, world_size):
        s = spec.generate(ids, max_new_tokens, eos_token_id)
        v = vanilla.generate(ids, max_new_tokens, eos_token_id)
        values = {"prompts": 1, "identical": int(s.tokens == v.tokens), "new_tokens": s.new_tokens,
                  "passes": s.full_passes, "drafted": s.drafted, "accepted": s.accepted,
                  "spec_time_s": s.wall_time_s, "vanilla_new_tokens": v.new_tokens, "vanilla_time_s": v.wall_time_s}
        for name, value in values.items():
            metrics[name].update(torch.tensor(float(value), dtype=torch.float64, device=device))


def decode_figures(totals: dict[str, float]) -> dict[str, float]:
    """MAT, acceptance rate, tokens/s, speedup and identical fraction from the summed counters (DESIGN §3):
    MAT = new tokens / full-model passes, tokens/s = new tokens / wall time (summed over prompts),
    speedup = self-speculative tokens/s / vanilla tokens/s."""
    spec_tps = totals["new_tokens"] / totals["spec_time_s"] if totals["spec_time_s"] > 0 else 0.0
    van_tps = totals["vanilla_new_tokens"] / totals["vanilla_time_s"] if totals["vanilla_time_s"] > 0 else 0.0
    return {
        "mat": totals["new_tokens"] / totals["passes"] if totals["passes"] else 0.0,
        "accept_rate": totals["accepted"] / totals["drafted"] if totals["drafted"] else 0.0,
        "tokens_per_s": spec_tps,
        "speedup": spec_tps / van_tps if van_tps > 0 else 0.0,
        "identical": totals["identical"] / totals["prompts"] if totals["prompts"] else 0.0,
    }


def module_modes(module: torch.nn.Module) -> dict[str, bool]:
    """The ``training`` flag of every submodule, by name (to put back exactly)."""
    return {name: m.training for name, m in module.named_modules()}


def restore_modes(module: torch.nn.Module, modes: dict[str, bool]) -> None:
    for name, m in module.named_modules():
        if name in modes:
            m.training = modes[name]


class DecodeEvalCallback(L.Callback):
    """The decode check: at the end of a validation, decode held-out prompts with the current weights.

    Greedy, batch 1, vanilla loop and self-speculative decoder on the same prompts in the same process,
    then logs through the LightningModule (so ``ModelCheckpoint`` / ``EarlyStopping`` can monitor them):

    * ``val/mat``: new tokens / full-model passes (Spec-Bench's MAT);
    * ``val/accept_rate``: accepted drafts / drafted tokens;
    * ``val/tokens_per_s``: the self-speculative decoder's new tokens / wall time, summed over prompts;
    * ``val/speedup``: that over the vanilla loop's tokens/s;
    * ``val/identical``: fraction of prompts whose output equals the vanilla loop's (1.0 expected in
      float32/64; a near-tie may flip in lower precision, never hidden).

    The counters are ``torchmetrics.SumMetric``; with several processes prompt i is decoded on rank
    ``i % world_size`` and ``compute()`` (a collective, called on every rank) sums them, so the figures are
    those of one process decoding every prompt (wall times are summed too). Train/eval mode of every
    submodule and the grad mode are as before the check. Skipped while sanity checking.

    Args:
        num_prompts: validation rows to decode (their prompt part, up to the first target token).
        max_new_tokens: tokens per prompt.
        threshold / max_draft: the decoder's settings (default: the module's ``decoding`` settings).
        every_n_validations: decode at every n-th validation (1: each); the others log nothing, so a
            monitor sees the last value.
    """

    def __init__(self, num_prompts: int = 4, max_new_tokens: int = 64, threshold: float | None = None,
                 max_draft: int | None = None, every_n_validations: int = 1) -> None:
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations must be >= 1, got {every_n_validations}")
        # The project's one set of decoding rules (values left to the module's settings are checked there).
        defaults = DecodingSettings()
        DecodingSettings.for_options(
            "DecodeCheck.", max_new_tokens=max_new_tokens,
            threshold=defaults.threshold if threshold is None else threshold,
            max_draft=defaults.max_draft if max_draft is None else max_draft)
        self.num_prompts = num_prompts
        self.max_new_tokens = max_new_tokens
        self.threshold = threshold
        self.max_draft = max_draft
        self.every_n_validations = every_n_validations
        self._validations = 0
        self.last: dict[str, float] | None = None  # the figures of the last check (every rank)
        self.totals: dict[str, float] | None = None  # and its summed counters

    def _prompts(self, trainer: L.Trainer) -> list[torch.Tensor]:
        dataset = getattr(trainer.datamodule, "val_dataset", None)
        prompts = []
        for i in range(min(self.num_prompts, len(dataset) if dataset is not None else 0)):
            item = dataset[i]
            labels = torch.as_tensor(item["labels"])
            targets = (labels != -100).nonzero()
            # Instruction rows: the prompt is everything before the first target. Plain text (every
            # token a target): its first 8 tokens, as the stories benchmark does.
            cut = int(targets[0]) if len(targets) else len(labels)
            if cut < 2:
                cut = min(8, len(labels))
            prompts.append(torch.as_tensor(item["input_ids"])[:cut].long().unsqueeze(0))
        return prompts

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank runs this (decoding its share of the prompts) and every rank calls compute(): a
        # rank-0-only check would leave the others waiting in the next collective, and a strategy that
        # shards the weights (ZeRO-3) gathers them in every forward, itself a collective.
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        prompts = self._prompts(trainer)
        if not prompts:
            return
        hp = pl_module.settings.decoding
        metrics = decode_check_metrics().to(pl_module.device)
        modes = module_modes(pl_module)
        pl_module.eval()
        try:
            with torch.no_grad():
                decode_prompts(pl_module.model, [p.to(pl_module.device) for p in prompts], metrics,
                               max_new_tokens=self.max_new_tokens,
                               eos_token_id=trainer.datamodule.tokenizer.eos_token_id,
                               threshold=self.threshold if self.threshold is not None else hp.threshold,
                               max_draft=self.max_draft or hp.max_draft, rank=trainer.global_rank,
                               world_size=trainer.world_size)
        finally:
            restore_modes(pl_module, modes)
        totals = {name: float(metric.compute()) for name, metric in metrics.items()}  # collective
        self.totals = totals
        self.last = decode_figures(totals)
        for name, value in self.last.items():
            pl_module.log(f"val/{name}", value, on_step=False, on_epoch=True, sync_dist=False)


class PeakMemoryCallback(L.Callback):
    """Log the peak memory of this process at every logged training step: ``train/peak_memory_gib``.

    On CUDA ``torch.cuda.max_memory_allocated`` (tensors, the allocator's view); elsewhere the process's
    peak resident set size (``resource.getrusage``, all of the process, the frozen base included).
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        device = pl_module.device
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        else:
            import resource
            import sys

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = rss if sys.platform == "darwin" else rss * 1024  # macOS: bytes; Linux: KiB
        pl_module.log("train/peak_memory_gib", peak / 2**30, on_step=True, on_epoch=False, batch_size=1)


def batch_rows(batch: dict[str, torch.Tensor]) -> int:
    """Rows of a training batch (``ThroughputMonitor``'s ``batch_size_fn``)."""
    return int(batch["input_ids"].shape[0])


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a batch (``ThroughputMonitor``'s ``length_fn``: items/s = tokens/s)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


class DriftReportCallback(L.Callback):
    """How far the model that verifies has moved from the original (DESIGN §2), on held-out data.

    Teacher-forced over the validation (test) batches, at target positions (label != -100):

    * ``val/ppl_original``: perplexity of the original model (LoRA off);
    * ``val/drift_agree``: fraction of positions where the argmax of the fine-tuned full path (the
      verifier) equals the original's; ``val/ppl_full`` (logged by the module) is the fine-tuned path's.

    With ``lora.scope: shared`` (LoRA in the verifier) both are measured on every batch. With
    ``lora.scope: draft`` or no LoRA the verifier *is* the original: that is checked on the first batch
    of each validation (both paths run; ``drift_agree`` comes from that batch, 1.0 unless something is
    wrong), and the original's perplexity is measured on every batch with one forward pass. Sums are
    ``torchmetrics.SumMetric`` (synchronised over processes).
    """

    STAGES = ("val", "test")

    def __init__(self) -> None:
        self._metrics: dict[str, torch.nn.ModuleDict] = {}
        self._batches: dict[str, int] = {}

    def _start(self, stage: str, pl_module: L.LightningModule) -> None:
        from torchmetrics import SumMetric

        self._metrics[stage] = torch.nn.ModuleDict(
            {name: SumMetric() for name in ("nll_original", "tokens", "agree", "compared")}
        ).to(torch.float64).to(pl_module.device)
        self._batches[stage] = 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start("val", pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start("test", pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._measure("val", pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._measure("test", pl_module, batch)

    @torch.no_grad()
    def _measure(self, stage: str, pl_module: L.LightningModule, batch: dict[str, torch.Tensor]) -> None:
        if stage not in self._metrics:
            self._start(stage, pl_module)
        metrics = self._metrics[stage]
        model = pl_module.model
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        shared = model.lora_scope == "shared"
        first = self._batches[stage] == 0
        self._batches[stage] += 1
        with model.lora_enabled(False):
            original = model.full_logits(batch["input_ids"])[:, :-1]
        dtype = torch.promote_types(original.dtype, torch.float32)
        targets = labels.masked_fill(~mask, 0)
        logp = torch.log_softmax(original.to(dtype), dim=-1)
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        metrics["nll_original"].update(nll[mask].sum().double())
        metrics["tokens"].update(mask.sum().double())
        if shared or first:
            full = model.full_logits(batch["input_ids"])[:, :-1]  # the verifier, as it decodes
            same = (full.argmax(-1) == original.argmax(-1)) & mask
            metrics["agree"].update(same.sum().double())
            metrics["compared"].update(mask.sum().double())
        else:
            zero = torch.zeros((), dtype=torch.float64, device=pl_module.device)
            metrics["agree"].update(zero)
            metrics["compared"].update(zero)

    def _log(self, stage: str, pl_module: L.LightningModule) -> None:
        metrics = self._metrics.pop(stage, None)
        if metrics is None:
            return
        totals = {name: float(m.compute()) for name, m in metrics.items()}  # collective: every rank
        if not totals["tokens"]:
            return
        ppl = torch.exp(torch.tensor(totals["nll_original"] / totals["tokens"], dtype=torch.float64))
        pl_module.log(f"{stage}/ppl_original", float(ppl), on_step=False, on_epoch=True, sync_dist=False)
        agree = totals["agree"] / totals["compared"] if totals["compared"] else float("nan")
        pl_module.log(f"{stage}/drift_agree", agree, on_step=False, on_epoch=True, sync_dist=False)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log("val", pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log("test", pl_module)
