"""KangarooLitModule: the LightningModule that trains the draft path with shallow-gradient propagation.

``loss = loss_main + beta_exit * loss_exit``. The frozen base is loaded in :meth:`configure_model`
(so DeepSpeed/FSDP can shard it as it is built); checkpoints hold only the trainable tensors, their
optimizer state and the model configuration (DESIGN §4b).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics import MeanMetric

from kangaroo_lit.architectures import load_base_model, resolve_dtype
from kangaroo_lit.embedded import TINY_MODEL, resolve_path
from kangaroo_lit.losses import IGNORE_INDEX, sgp_loss
from kangaroo_lit.model import LLAMA_TARGET_MODULES, KangarooModel, LoraSettings

# The frozen base is deliberately kept in eval mode (no dropout in the model being served).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to this model configuration (other base, exit layer, LoRA, ...)."""


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite; nothing is saved over the last good checkpoint."""


# The hyperparameters that define the shape and meaning of the trainable state. A checkpoint made
# with different values cannot be resumed into this model (see :meth:`on_load_checkpoint`).
STRUCTURAL_HPARAMS = (
    "base_model",
    "exit_layer",
    "lora_rank",
    "lora_alpha",
    "lora_target_modules",
    "lora_scope",
    "exit_head",
)


class KangarooLitModule(L.LightningModule):
    """Frozen base LM + shallow LoRA + Kangaroo adapter + exit head, trained with SGP.

    Args:
        base_model: HF Hub name or local directory of the base causal LM (Llama, Mistral, Qwen2,
            Qwen3). ``embedded:tiny-llama`` is the project's own tiny model.
        exit_layer: L; the draft path exits after decoder layer L (``hidden_states[L + 1]``).
        dtype: dtype the frozen base is loaded in (float32, bfloat16, float16, float64).
        attn_implementation: HF attention backend (``sdpa`` or ``eager``).
        lora_rank: LoRA rank on layers ``0..exit_layer``; 0 turns LoRA off (pure Kangaroo).
        lora_alpha: LoRA scaling numerator (scale = alpha / rank).
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: module names LoRA wraps; None = q/k/v/o/gate/up/down_proj (the names in
            Llama, Mistral, Qwen2 and Qwen3).
        lora_scope: ``draft`` (LoRA only on the draft path; the verifier stays the untouched base) or
            ``shared`` (LoRA in both paths, the original SGP code; lossless only w.r.t. the merged model).
        exit_head: ``shared`` (the frozen ``lm_head``, Kangaroo) or ``trainable`` (a copy that trains).
        beta_exit: weight of the exit loss. 0 (with ``detach_exit: false``) skips the draft path in
            training: plain LoRA fine-tuning of layers ``0..exit_layer``, the benchmark's baseline.
        exit_loss: ``ce`` (labels), ``kd`` (distil the full path, what Kangaroo trains with) or ``mix``.
        kd_weight: weight of ``kd`` within ``mix``.
        detach_exit: SGP. The deep layers get a detached input and run under ``no_grad``; False is the
            joint baseline where ``loss_main`` back-propagates into the shallow LoRA.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay, on matrices only (not norms or biases).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        lr_schedule: after warm-up: ``cosine`` decay to ``min_lr_ratio * lr``, ``linear``, or ``constant``.
        min_lr_ratio: floor of the decayed learning rate, as a fraction of the peak.
        max_new_tokens: tokens to generate per prompt in ``predict``.
        threshold: decoding: a draft whose top-1 probability is below this ends the round (Kangaroo: 0.6).
        max_draft: decoding: most tokens drafted per round (Kangaroo: 6).
        temperature: decoding in ``predict``: 0 = greedy, else lossless speculative sampling.
    """

    def __init__(
        self,
        base_model: str = TINY_MODEL,
        exit_layer: int = 6,
        dtype: str = "float32",
        attn_implementation: Literal["sdpa", "eager"] = "sdpa",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        lora_scope: Literal["draft", "shared"] = "draft",
        exit_head: Literal["shared", "trainable"] = "shared",
        beta_exit: float = 0.7,
        exit_loss: Literal["ce", "kd", "mix"] = "ce",
        kd_weight: float = 0.5,
        detach_exit: bool = True,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        min_lr_ratio: float = 0.1,
        max_new_tokens: int = 128,
        threshold: float = 0.6,
        max_draft: int = 6,
        temperature: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if beta_exit < 0:
            raise ValueError(f"beta_exit must be >= 0, got {beta_exit}")
        if beta_exit == 0 and (detach_exit or lora_rank == 0 or lora_scope == "draft"):
            raise ValueError(
                "beta_exit=0 trains only through loss_main, which needs detach_exit=false, lora_rank > 0 and "
                "lora_scope=shared (plain LoRA fine-tuning of the shallow layers); got "
                f"detach_exit={detach_exit}, lora_rank={lora_rank}, lora_scope={lora_scope!r}"
            )
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = no LoRA), got {lora_rank}")
        resolve_dtype(dtype)  # fail at construction on a bad dtype name, not after loading
        self.model: KangarooModel | None = None
        self._resume_rng: dict[str, Any] | None = None
        self._all_finite: torch.Tensor | None = None
        self._last_terms: tuple | None = None
        self._resume_position: tuple[int, int] | None = None
        # Frozen base weights are not in checkpoints; loading must not demand them.
        self.strict_loading = False
        for stage in ("val", "test"):
            self.add_module(
                f"{stage}_metrics",
                torch.nn.ModuleDict(
                    {
                        name: MeanMetric()
                        for name in ("ce_main", "ce_draft", "loss_exit", "expected_accept", "top1_agree")
                    }
                ),
            )

    # ----------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the frozen base and build LoRA, adapter and exit head (once; Lightning may call again)."""
        if self.model is not None:
            return
        hp = self.hparams
        base = load_base_model(resolve_path(hp.base_model), hp.dtype, hp.attn_implementation)
        lora = None
        if hp.lora_rank > 0:
            lora = LoraSettings(
                rank=hp.lora_rank,
                alpha=hp.lora_alpha,
                dropout=hp.lora_dropout,
                target_modules=self.lora_targets,
                scope=hp.lora_scope,
            )
        self.model = KangarooModel(base, hp.exit_layer, lora=lora, exit_head=hp.exit_head)
        if hp.beta_exit == 0:
            # Plain LoRA fine-tuning: the draft path is never trained, so keep it out of the
            # optimizer and the checkpoint.
            self.model.adapter.requires_grad_(False)
            if self.model.exit_proj is not None:
                self.model.exit_proj.requires_grad_(False)

    @property
    def lora_targets(self) -> list[str]:
        """LoRA target module names (None in the hyperparameters means the Llama names)."""
        targets = self.hparams.lora_target_modules
        return list(targets) if targets else list(LLAMA_TARGET_MODULES)

    def trainable_state_keys(self) -> dict[str, torch.Size]:
        """Checkpoint keys (``model.``-prefixed) and shapes of the trainable tensors."""
        return {f"model.{n}": p.shape for n, p in self.model.named_parameters() if p.requires_grad}

    # ----------------------------------------------------------------------------------------------
    def _step(self, batch: dict[str, torch.Tensor]):
        out = self.model(
            batch["input_ids"],
            batch.get("attention_mask"),
            detach_exit=self.hparams.detach_exit,
            compute_exit=self.hparams.beta_exit > 0 or not self.training,
        )
        return sgp_loss(
            out.main_logits,
            out.exit_logits,
            batch["labels"],
            beta_exit=self.hparams.beta_exit,
            exit_loss=self.hparams.exit_loss,
            kd_weight=self.hparams.kd_weight,
        ), out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms, out = self._step(batch)
        # Checked in on_before_optimizer_step: testing here would make the host wait for the forward
        # pass on every micro-batch; the flag stays on the device until the update is due.
        finite = torch.isfinite(terms.loss.detach())
        self._all_finite = finite if self._all_finite is None else self._all_finite & finite
        self._last_terms = (terms.loss.detach(), terms.loss_main.detach(), terms.loss_exit.detach(), batch_idx)
        batch_size = batch["input_ids"].shape[0]
        log = dict(on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/loss", terms.loss, prog_bar=True, **log)
        self.log("train/loss_main", terms.loss_main, **log)
        if out.exit_logits is not None:
            self.log("train/loss_exit", terms.loss_exit, **log)
            self.log("train/expected_accept", terms.expected_accept, prog_bar=True, **log)
            self.log("train/top1_agree", terms.top1_agree, **log)
        if "attention_mask" in batch:
            self.log("train/padding_fraction", 1.0 - batch["attention_mask"].float().mean(), **log)
        self.log("train/tokens", terms.num_tokens.float(), reduce_fx="sum", **log)
        return terms.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop before an update computed from a NaN or infinite loss (of any accumulated micro-batch)."""
        all_finite, self._all_finite = self._all_finite, None
        if all_finite is not None and not bool(all_finite):
            loss, loss_main, loss_exit, batch_idx = self._last_terms
            raise NonFiniteLossError(
                f"non-finite training loss (last micro-batch: loss={loss.item()}, loss_main={loss_main.item()}, "
                f"loss_exit={loss_exit.item()}) at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); the run stops before this step's "
                "update, so the last checkpoint on disk is the last good one. Lower the learning rate, "
                "use bf16 instead of fp16, or inspect this batch."
            )

    def _eval_step(self, stage: str, batch: dict[str, torch.Tensor]) -> None:
        terms, out = self._step(batch)
        labels = batch["labels"]
        n = terms.num_tokens.float()
        metrics = getattr(self, f"{stage}_metrics")
        # Token-weighted means, so perplexity does not depend on how rows fall into batches.
        metrics["ce_main"].update(terms.loss_main, n)
        draft_ce = torch.nn.functional.cross_entropy(
            out.exit_logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        metrics["ce_draft"].update(draft_ce, n)
        metrics["loss_exit"].update(terms.loss_exit, n)
        metrics["expected_accept"].update(terms.expected_accept, n)
        metrics["top1_agree"].update(terms.top1_agree, n)

    def _eval_epoch_end(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        ce_main = metrics["ce_main"].compute()
        ce_draft = metrics["ce_draft"].compute()
        values = {
            f"{stage}/loss_main": ce_main,
            f"{stage}/loss_exit": metrics["loss_exit"].compute(),
            f"{stage}/loss": ce_main + self.hparams.beta_exit * metrics["loss_exit"].compute(),
            f"{stage}/ppl_full": torch.exp(ce_main),
            f"{stage}/ppl_draft": torch.exp(ce_draft),
            f"{stage}/expected_accept": metrics["expected_accept"].compute(),
            f"{stage}/top1_agree": metrics["top1_agree"].compute(),
        }
        self.log_dict(values, prog_bar=False, sync_dist=False)
        for metric in metrics.values():
            metric.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Decode one prompt with the self-speculative decoder; returns the response and its statistics."""
        from kangaroo_lit.decoding import SelfSpeculativeDecoder

        hp = self.hparams
        tokenizer = self.trainer.datamodule.tokenizer
        decoder = SelfSpeculativeDecoder(self.model, threshold=hp.threshold, max_draft=hp.max_draft)
        result = decoder.generate(
            batch["input_ids"].to(self.device),
            max_new_tokens=hp.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            temperature=hp.temperature,
        )
        return {
            "index": int(batch["index"]),
            "prompt": batch["prompt"],
            "response": tokenizer.decode(result.tokens, skip_special_tokens=True),
            "new_tokens": result.new_tokens,
            "mat": result.mat,
            "accept_rate": result.accept_rate,
            "tokens_per_s": result.tokens_per_s,
        }

    # ----------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        """AdamW over exactly the trainable parameters, with warm-up then cosine/linear/constant."""
        hp = self.hparams
        decay, no_decay = [], []
        for _, p in self.model.trainable_parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        if not decay and not no_decay:
            raise ValueError("nothing to train: no parameter requires grad")
        groups = [{"params": decay, "weight_decay": hp.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total)

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if hp.lr_schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if hp.lr_schedule == "linear":
                shape = 1.0 - progress
            else:
                shape = 0.5 * (1.0 + math.cos(math.pi * progress))
            return hp.min_lr_ratio + (1.0 - hp.min_lr_ratio) * shape

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable tensors, and record the structure they belong to."""
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["kangaroo_structure"] = self.structure()
        checkpoint["kangaroo_rng"] = _get_rng_state()
        # The latest validation figures travel with the checkpoint into the exported model card.
        metrics = self._trainer.callback_metrics if self._trainer is not None else {}
        checkpoint["kangaroo_metrics"] = {
            k: float(v) for k, v in metrics.items() if k.startswith("val/") and v.numel() == 1
        }

    def structure(self) -> dict[str, Any]:
        """The structural hyperparameters, LoRA targets resolved (what a checkpoint must match)."""
        values = {k: self.hparams[k] for k in STRUCTURAL_HPARAMS}
        values["lora_target_modules"] = self.lora_targets if self.hparams.lora_rank > 0 else None
        return values

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another configuration; prepare an exact mid-epoch resume.

        Raises:
            CheckpointMismatchError: listing every structural argument and tensor key that differs.
        """
        problems = []
        saved = checkpoint.get("kangaroo_structure")
        if saved is not None:
            current = self.structure()
            for key in STRUCTURAL_HPARAMS:
                if key in saved and _plain(saved[key]) != _plain(current[key]):
                    problems.append(f"{key}: checkpoint {saved[key]!r}, this model {current[key]!r}")
        # DeepSpeed restores the weights itself and hands over a checkpoint without "state_dict":
        # then only the recorded structure can be compared.
        expected = self.trainable_state_keys() if "state_dict" in checkpoint else {}
        got = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        reshaped = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != got[k])
        for label, keys in (("missing from checkpoint", missing), ("not in this model", unexpected)):
            if keys:
                more = " ..." if len(keys) > 8 else ""
                problems.append(f"{len(keys)} tensor(s) {label}: {', '.join(keys[:8])}{more}")
        for k in reshaped[:8]:
            problems.append(f"shape of {k}: checkpoint {got[k]}, this model {tuple(expected[k])}")
        if problems:
            raise CheckpointMismatchError(
                "checkpoint does not match this model configuration:\n  " + "\n  ".join(problems)
            )
        self._resume_rng = checkpoint.get("kangaroo_rng")
        loops = checkpoint.get("loops", {}).get("fit_loop")
        if loops:
            epoch = loops["epoch_progress"]["current"]["processed"]
            batches_done = loops["epoch_loop.batch_progress"]["current"]["processed"]
            self._resume_position = (int(epoch), int(batches_done))

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self._resume_position is not None and hasattr(datamodule, "set_resume_position"):
            datamodule.set_resume_position(*self._resume_position)
        self._resume_position = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restore the RNG right before the first resumed step, so LoRA dropout draws the same masks
        # as the uninterrupted run whatever happened in between (sanity checks, loader start-up).
        if self._resume_rng is not None:
            _set_rng_state(self._resume_rng)
            self._resume_rng = None


def saved_hparams(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The model arguments a Lightning checkpoint was made with (LightningCLI's bookkeeping keys removed)."""
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    for key in ("_instantiator", "_class_path"):
        hparams.pop(key, None)
    return hparams


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _get_rng_state() -> dict[str, Any]:
    # Only torch's generators: they drive LoRA dropout; tensors keep the checkpoint loadable with
    # ``torch.load(weights_only=True)``.
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
