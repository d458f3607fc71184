"""Lightning callbacks: prediction output and decoding checks at validation time."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


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


class DecodeEvalCallback(L.Callback):
    """At each validation end, decode a few held-out prompts and log what decoding would achieve.

    Logs ``decode/mat`` (mean accepted tokens per full-model pass), ``decode/accept_rate`` and
    ``decode/speedup`` (self-speculative vs the vanilla loop, same prompts, same process). Greedy
    outputs are compared with the vanilla loop's: ``decode/identical`` is the fraction that match
    (1.0 expected in float32 on CPU; a near-tie may flip in lower precision, never hidden).
    With several processes every rank decodes the same prompts and rank 0 logs.

    Args:
        num_prompts: validation rows to decode (their prompt part, up to the first target token).
        max_new_tokens: tokens per prompt.
        threshold / max_draft: the decoder's settings (default: the module's).
    """

    def __init__(self, num_prompts: int = 4, max_new_tokens: int = 64, threshold: float | None = None,
                 max_draft: int | None = None) -> None:
        self.num_prompts = num_prompts
        self.max_new_tokens = max_new_tokens
        self.threshold = threshold
        self.max_draft = max_draft

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

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank decodes the same prompts; the loggers write on rank 0 only. Not rank 0 alone:
        # the other ranks would wait for it in the next collective (under a process-group timeout),
        # and a strategy that shards the weights (ZeRO-3) gathers them in every forward, which is
        # itself a collective.
        if trainer.sanity_checking:
            return
        from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder

        hp = pl_module.settings.decoding
        spec = SelfSpeculativeDecoder(pl_module.model, threshold=self.threshold if self.threshold is not None
                                      else hp.threshold, max_draft=self.max_draft or hp.max_draft)
        vanilla = VanillaDecoder(pl_module.model)
        eos = trainer.datamodule.tokenizer.eos_token_id
        totals: dict[str, Any] = {"spec_t": 0.0, "van_t": 0.0, "spec_n": 0, "van_n": 0, "passes": 0,
                                  "drafted": 0, "accepted": 0, "same": 0, "count": 0}
        was_training = pl_module.training
        pl_module.eval()
        for ids in self._prompts(trainer):
            ids = ids.to(pl_module.device)
            s = spec.generate(ids, self.max_new_tokens, eos)
            v = vanilla.generate(ids, self.max_new_tokens, eos)
            totals["spec_t"] += s.wall_time_s
            totals["van_t"] += v.wall_time_s
            totals["spec_n"] += s.new_tokens
            totals["van_n"] += v.new_tokens
            totals["passes"] += s.full_passes
            totals["drafted"] += s.drafted
            totals["accepted"] += s.accepted
            totals["same"] += int(s.tokens == v.tokens)
            totals["count"] += 1
        pl_module.train(was_training)
        if not totals["count"]:
            return
        metrics = {
            "decode/mat": totals["spec_n"] / max(1, totals["passes"]),
            "decode/accept_rate": totals["accepted"] / max(1, totals["drafted"]),
            "decode/speedup": (totals["spec_n"] / totals["spec_t"]) / max(1e-9, totals["van_n"] / totals["van_t"]),
            "decode/identical": totals["same"] / totals["count"],
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
