"""KangarooLitModule: the LightningModule that trains the draft path with shallow-gradient propagation.

``loss = loss_main + beta_exit * loss_exit``. The frozen base is loaded in :meth:`configure_model`
(so DeepSpeed/FSDP can shard it as it is built); checkpoints hold only the trainable tensors, their
optimizer state and the run's settings (DESIGN §4b). Whether a checkpoint fits this module is decided
in :mod:`kangaroo_lit.checkpointing`; the settings themselves are typed in :mod:`kangaroo_lit.settings`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from kangaroo_lit.architectures import load_base_model, resolve_dtype
from kangaroo_lit.checkpointing import SETTINGS_KEY, check_checkpoint_fits
from kangaroo_lit.draft_vocab import select_draft_vocab
from kangaroo_lit.embedded import TINY_MODEL, resolve_path
from kangaroo_lit.errors import ConfigError
from kangaroo_lit.losses import draft_cross_entropy, draft_targets, sgp_loss
from kangaroo_lit.model import KangarooModel
from kangaroo_lit.optim import build_optimizer, build_scheduler
from kangaroo_lit.rng import RngStateCallback
from kangaroo_lit.settings import (
    DecodingSettings,
    DraftSettings,
    KangarooSettings,
    LoraSettings,
    LossSettings,
    OptimizerSettings,
)

# Defaults of the grouped settings (frozen dataclasses: safe to share).
DEFAULT_LORA = LoraSettings()
DEFAULT_DRAFT = DraftSettings()
DEFAULT_LOSS = LossSettings()
DEFAULT_OPTIMIZER = OptimizerSettings()
DEFAULT_DECODING = DecodingSettings()


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite; nothing is saved over the last good checkpoint."""


def computed_terms(terms: Any, out: Any) -> dict[str, torch.Tensor]:
    """The loss terms a training step actually computed, detached, by name (for an error message).

    ``loss_main`` exists only when the full path ran, ``loss_exit`` only when the draft path did; the
    other is a NaN placeholder, which must not be reported as if it were the loss that went wrong.
    ``loss`` is the full objective when both ran, else ``beta_exit * loss_exit`` or ``loss_main``: named
    for what it is.
    """
    has_main, has_exit = out.main_logits is not None, out.exit_logits is not None
    optimised = "loss" if has_main and has_exit else ("beta_exit*loss_exit" if has_exit else "loss_main")
    computed = {optimised: terms.loss.detach()}
    if has_main and has_exit:
        computed["loss_main"] = terms.loss_main.detach()
    if has_exit:
        computed["loss_exit"] = terms.loss_exit.detach()
    return computed


class KangarooLitModule(L.LightningModule):
    """Frozen base LM + shallow LoRA + Kangaroo adapter + exit head, trained with SGP.

    Args:
        base_model: HF Hub name or local directory of the base causal LM (Llama, Mistral, Qwen2,
            Qwen3). ``embedded:tiny-llama`` is the project's own tiny model.
        exit_layer: L; the draft path exits after decoder layer L (``hidden_states[L + 1]``).
        dtype: dtype the frozen base is loaded in (float32, bfloat16, float16, float64).
        attn_implementation: HF attention backend (``sdpa`` or ``eager``).
        lora: LoRA on layers ``0..exit_layer`` (rank 0 = none, pure Kangaroo) and its scope.
        draft: the exit head (shared ``lm_head`` or a trainable copy).
        loss: the objective (``beta_exit``, ``exit_loss``, ``kd_weight``, ``detach_exit`` = SGP).
        optimizer: AdamW and its warm-up + decay schedule.
        decoding: decoding in ``predict`` and in decode checks (free to change when resuming).

    ``self.settings`` holds all of them as one :class:`~kangaroo_lit.settings.KangarooSettings`.
    """

    def __init__(
        self,
        base_model: str = TINY_MODEL,
        exit_layer: int = 1,  # valid for the default base (the embedded 6-layer model: 0..4); configs/tiny.yaml
        dtype: str = "float32",
        attn_implementation: Literal["sdpa", "eager"] = "sdpa",
        lora: LoraSettings = DEFAULT_LORA,
        draft: DraftSettings = DEFAULT_DRAFT,
        loss: LossSettings = DEFAULT_LOSS,
        optimizer: OptimizerSettings = DEFAULT_OPTIMIZER,
        decoding: DecodingSettings = DEFAULT_DECODING,
    ) -> None:
        super().__init__()
        # Deliberately no save_hyperparameters(): LightningCLI would then re-parse a checkpoint's
        # hyperparameters over the command line on resume. The settings travel in the checkpoint
        # under their own key instead (on_save_checkpoint), and the CLI reconciles them itself.
        self.settings = KangarooSettings.from_dict(
            dict(base_model=base_model, exit_layer=exit_layer, dtype=dtype, attn_implementation=attn_implementation,
                 lora=lora, draft=draft, loss=loss, optimizer=optimizer, decoding=decoding)
        )
        resolve_dtype(dtype)  # fail at construction on a bad dtype name, not after loading
        self.model: KangarooModel | None = None
        self._draft_vocab_placeholder = False  # draft.vocab_size ids not chosen yet (a checkpoint brings them)
        self._all_finite: torch.Tensor | None = None
        self._last_terms: tuple | None = None
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

    @classmethod
    def from_settings(cls, settings: KangarooSettings) -> KangarooLitModule:
        """A module with these settings (e.g. a checkpoint's, :func:`~kangaroo_lit.checkpointing.saved_settings`)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)})

    @classmethod
    def default_settings(cls) -> KangarooSettings:
        """The settings of ``KangarooLitModule()`` (the constructor's defaults)."""
        params = inspect.signature(cls.__init__).parameters
        return KangarooSettings.from_dict({k: p.default for k, p in params.items() if k != "self"})

    # ----------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the frozen base and build LoRA, adapter and exit head (once; Lightning may call again).

        With ``draft.vocab_size`` K the head scores K token ids: when fitting, the K most frequent targets
        of the training data (``trainer.datamodule.target_token_counts``, EOS always included; a resumed
        fit then takes the checkpoint's ids); elsewhere (export, load, predict) placeholder ids of the
        right shape, which the checkpoint's ``model.draft_vocab`` replaces.
        """
        if self.model is not None:
            if self._draft_vocab_placeholder:
                ids = self._draft_vocab_from_data(self.model.causal_lm)
                if ids is not None:  # built before a trainer was attached (e.g. by hand): now the data is known
                    self.model.set_draft_vocab(ids)
                    self._draft_vocab_placeholder = False
            return
        s = self.settings
        base = load_base_model(resolve_path(s.base_model), s.dtype, s.attn_implementation)
        draft_vocab = None
        if s.draft.vocab_size is not None:
            vocab = base.get_output_embeddings().out_features
            if s.draft.vocab_size > vocab:
                raise ConfigError(f"draft.vocab_size {s.draft.vocab_size} exceeds the vocabulary of {s.base_model} "
                                  f"({vocab}); use at most {vocab}, or null for the full vocabulary")
            draft_vocab = self._draft_vocab_from_data(base)
            self._draft_vocab_placeholder = draft_vocab is None
            if draft_vocab is None:
                draft_vocab = torch.arange(s.draft.vocab_size)
        self.model = KangarooModel(base, s.exit_layer, lora=s.lora, exit_head=s.draft.exit_head,
                                   draft_vocab=draft_vocab, adapter_mlp=s.draft.adapter_mlp)
        if s.loss.beta_exit == 0:
            # Plain LoRA fine-tuning: the draft path is never trained, so keep it out of the
            # optimizer and the checkpoint.
            self.model.adapter.requires_grad_(False)
            if self.model.exit_proj is not None:
                self.model.exit_proj.requires_grad_(False)

    def _draft_vocab_from_data(self, base) -> torch.Tensor | None:
        """The K ids from the attached data module's token counts; None outside ``fit`` without them.

        Raises:
            ConfigError: fitting with ``draft.vocab_size`` but no token counts to choose the ids by.
        """
        k = self.settings.draft.vocab_size
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        counts = getattr(datamodule, "target_token_counts", None)
        if counts is None:
            if trainer is not None and trainer.state.fn == "fit":
                raise ConfigError(
                    f"draft.vocab_size={k} needs the training data's token counts to choose the draft vocabulary, "
                    "and this fit has none: train with kangaroo_lit's InstructionDataModule (it counts the train "
                    "split's target tokens in setup()) or a data module with a `target_token_counts` (V,) tensor; "
                    "or set draft.vocab_size: null for the full vocabulary"
                )
            return None
        eos = set()
        tokenizer = getattr(datamodule, "tokenizer", None)
        for source in (getattr(tokenizer, "eos_token_id", None), getattr(base.generation_config, "eos_token_id", None),
                       getattr(base.config, "eos_token_id", None)):
            eos.update(source if isinstance(source, (list, tuple)) else [source] if source is not None else [])
        vocab = base.get_output_embeddings().out_features
        try:
            return select_draft_vocab(counts, k, vocab, always=sorted(eos))
        except ValueError as err:
            raise ConfigError(f"draft.vocab_size={k}: {err}") from None

    def configure_callbacks(self) -> list[L.Callback]:
        """The RNG state travels with every checkpoint of this module, whoever builds the Trainer; validation and
        test report the verifier's drift from the original model (``val/ppl_original``, ``val/drift_agree``)."""
        from kangaroo_lit.callbacks import DriftReportCallback

        return [RngStateCallback(), DriftReportCallback()]

    def trainable_state_keys(self) -> dict[str, torch.Size]:
        """Checkpoint keys (``model.``-prefixed) and shapes of the trainable tensors, and of the token ids of a
        restricted draft head (``model.draft_vocab``: what the trained head's rows mean)."""
        keys = {f"model.{n}": p.shape for n, p in self.model.named_parameters() if p.requires_grad}
        if self.model.draft_vocab is not None:
            keys["model.draft_vocab"] = self.model.draft_vocab.shape
        return keys

    # ----------------------------------------------------------------------------------------------
    def _skips_full_path(self) -> bool:
        """Training with SGP and a label-only exit loss: the full path reaches neither a trainable weight nor
        the loss's gradient, so it is not computed (the same update, several times cheaper on a deep model;
        ``train/loss``, ``train/loss_main`` and the agreement metrics are then logged in validation only
        (as ``val/...``), and ``train/loss_exit`` is the training curve)."""
        loss = self.settings.loss
        return self.training and loss.detach_exit and loss.exit_loss == "ce" and loss.beta_exit > 0

    def _step(self, batch: dict[str, torch.Tensor]):
        out = self.model(
            batch["input_ids"],
            batch.get("attention_mask"),
            detach_exit=self.settings.loss.detach_exit,
            compute_exit=self.settings.loss.beta_exit > 0 or not self.training,
            compute_main=not self._skips_full_path(),
        )
        return sgp_loss(
            out.main_logits,
            out.exit_logits,
            batch["labels"],
            beta_exit=self.settings.loss.beta_exit,
            exit_loss=self.settings.loss.exit_loss,
            kd_weight=self.settings.loss.kd_weight,
            draft_vocab=out.draft_vocab,
        ), out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms, out = self._step(batch)
        # Checked in on_before_optimizer_step: testing here would make the host wait for the forward
        # pass on every micro-batch; the flag stays on the device until the update is due.
        finite = torch.isfinite(terms.loss.detach())
        self._all_finite = finite if self._all_finite is None else self._all_finite & finite
        self._last_terms = (computed_terms(terms, out), batch_idx)
        batch_size = batch["input_ids"].shape[0]
        log = dict(on_step=True, on_epoch=False, batch_size=batch_size)
        # train/loss is the full objective, loss_main + beta_exit * loss_exit, or absent: with the full
        # path skipped (SGP + ce) the optimised value is beta_exit * loss_exit, a different quantity that
        # must not be plotted as the same curve; train/loss_exit is then the figure to watch.
        if out.main_logits is not None:
            self.log("train/loss", terms.loss, prog_bar=True, **log)
            self.log("train/loss_main", terms.loss_main, **log)
        if out.exit_logits is not None:
            self.log("train/loss_exit", terms.loss_exit, prog_bar=out.main_logits is None, **log)
        if out.exit_logits is not None and out.main_logits is not None:
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
            computed, batch_idx = self._last_terms
            values = ", ".join(f"{name}={value.item()}" for name, value in computed.items())
            raise NonFiniteLossError(
                f"non-finite training loss (last micro-batch: {values}) at global step {self.global_step} "
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
        # With a restricted draft head: over the labels inside its vocabulary (as its ce loss).
        targets = draft_targets(labels[:, 1:].flatten(), out.draft_vocab, out.main_logits.shape[-1])
        draft_ce = draft_cross_entropy(out.exit_logits[:, :-1].float().flatten(0, 1), targets)
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
            f"{stage}/loss": ce_main + self.settings.loss.beta_exit * metrics["loss_exit"].compute(),
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

    def on_predict_start(self) -> None:
        """Check every prompt against the model's context before the first is decoded.

        A prompt too long for ``decoding.max_new_tokens`` more tokens would otherwise stop the run halfway,
        after earlier prompts were decoded. The prompts are the predict loaders' items (dicts with
        ``input_ids`` and, from the data module, ``source`` naming the file and line).
        """
        from torch.utils.data import IterableDataset

        from kangaroo_lit.data.prompt_file import check_prompt_lengths

        loaders = self.trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        prompts = []
        for loader in loaders:
            dataset = getattr(loader, "dataset", None)
            if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
                continue  # a stream: its prompts are checked one by one when decoded
            for position in range(len(dataset)):
                item = dataset[position]
                if isinstance(item, dict) and torch.is_tensor(item.get("input_ids")):
                    where = item.get("source") or f"prompt {item.get('index', position)}"
                    prompts.append((where, item["input_ids"].shape[-1]))
        check_prompt_lengths(prompts, self.settings.decoding.max_new_tokens,
                             getattr(self.model.config, "max_position_embeddings", None),
                             option="--model.decoding.max_new_tokens")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Decode one prompt with the self-speculative decoder; returns the response and its statistics."""
        from kangaroo_lit.decoding import SelfSpeculativeDecoder

        hp = self.settings.decoding
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
        """AdamW over exactly the trainable parameters, with warm-up then cosine/linear/constant decay.

        The schedule spans ``trainer.estimated_stepping_batches`` optimizer steps, which already
        accounts for gradient accumulation and the number of processes.
        """
        optimizer = build_optimizer((p for _, p in self.model.trainable_parameters()), self.settings.optimizer)
        scheduler = build_scheduler(optimizer, self.settings.optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """Say once (rank 0) how many rows one optimizer step sees and how many steps the schedule spans.

        global batch = rows per batch per process x processes x ``accumulate_grad_batches``. With several
        processes each takes its own share of every epoch's batches (the data module's sampler shards by
        rank), so at the same global batch a run has the same number of optimizer steps whatever the
        process count; the LR schedule spans ``trainer.estimated_stepping_batches`` of them.
        """
        trainer = self.trainer
        per_process = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if per_process is None:
            loader = trainer.train_dataloader
            per_process = getattr(loader, "batch_size", None) or getattr(
                getattr(loader, "batch_sampler", None), "batch_size", None)
        processes, accumulation = trainer.world_size, trainer.accumulate_grad_batches
        steps = trainer.estimated_stepping_batches
        global_batch = per_process * processes * accumulation if per_process else "?"
        rank_zero_info(
            f"global batch {global_batch} rows per optimizer step = {per_process or '?'} per process x "
            f"{processes} process(es) x {accumulation} accumulation step(s); {steps} optimizer steps in "
            f"this run's schedule (from step {trainer.global_step})"
        )

    # ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable tensors, and record the settings they belong to."""
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[SETTINGS_KEY] = self.settings.to_dict()
        # The latest validation figures travel with the checkpoint into the exported model card.
        metrics = self.trainer.callback_metrics
        checkpoint["kangaroo_metrics"] = {
            k: float(v) for k, v in metrics.items() if k.startswith("val/") and v.numel() == 1
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another configuration (:func:`~kangaroo_lit.checkpointing.check_checkpoint_fits`)."""
        check_checkpoint_fits(checkpoint, self.settings, self.trainable_state_keys())
