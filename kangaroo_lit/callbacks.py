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
    """Write ``predict`` results as JSON lines (one per prompt, in prompt order).

    Args:
        output_path: the file; default ``<default_root_dir>/predictions.jsonl``.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_path = output_path

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        path = Path(self.output_path or os.path.join(trainer.default_root_dir, "predictions.jsonl"))
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        with path.open("w") as f:
            for row in sorted(rows, key=lambda r: r["index"]):
                f.write(json.dumps(row) + "\n")
        mats = [r["mat"] for r in rows]
        print(f"wrote {len(rows)} responses to {path} (mean MAT {sum(mats) / max(1, len(mats)):.2f})")


class DecodeEvalCallback(L.Callback):
    """At each validation end, decode a few held-out prompts and log what decoding would achieve.

    Logs ``decode/mat`` (mean accepted tokens per full-model pass), ``decode/accept_rate`` and
    ``decode/speedup`` (self-speculative vs the vanilla loop, same prompts, same process). Greedy
    outputs are compared with the vanilla loop's: ``decode/identical`` is the fraction that match
    (1.0 expected in float32 on CPU; a near-tie may flip in lower precision, never hidden).

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
        if trainer.sanity_checking or not trainer.is_global_zero:
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
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
