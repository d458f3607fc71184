"""Typed settings of a Kangaroo run, grouped by meaning.

The LightningModule takes the base model and the exit layer plus one settings object per concern:

* :class:`~kangaroo_lit.model.LoraSettings`: LoRA on the shallow layers (``model.lora.*``);
* :class:`DraftSettings`: the draft path's exit head (``model.draft.*``);
* :class:`LossSettings`: the training objective (``model.loss.*``);
* :class:`OptimizerSettings`: AdamW and its learning-rate schedule (``model.optimizer.*``);
* :class:`DecodingSettings`: how drafts are decoded in ``predict`` and in decode checks (``model.decoding.*``).

What a checkpoint must agree on is a property of these types, not a list kept by hand:

* a field declared with :func:`structural` defines the shape or the meaning of the trainable state
  (a checkpoint with another value cannot be loaded at all);
* a type whose ``FREE_ON_RESUME`` is True (decoding) never constrains a resume;
* everything else may change outside ``fit`` but not when resuming ``fit`` (the run would no longer
  be the one the checkpoint continues).
:func:`resume_policy` walks :class:`KangarooSettings` and answers per dotted field name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from kangaroo_lit.errors import ConfigError
from kangaroo_lit.model import ExitHeadMode, LoraSettings

__all__ = [
    "DecodingSettings",
    "DraftSettings",
    "KangarooSettings",
    "LoraSettings",
    "LossSettings",
    "OptimizerSettings",
    "ResumePolicy",
    "resume_policy",
    "structural",
    "structure_of",
]

_STRUCTURAL = "structural"


def structural(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field that defines the trainable state: checkpoints must match it exactly."""
    return field(default=default, metadata={_STRUCTURAL: True}, **kwargs)


@dataclass(frozen=True)
class DraftSettings:
    """The draft path's exit head.

    Args:
        exit_head: ``shared`` (the frozen ``lm_head``, Kangaroo) or ``trainable`` (a copy that trains).
        vocab_size: K, a cheaper draft head: the exit head scores only the K most frequent target tokens
            of the training data (EOS always among them); None scores the full vocabulary. Drafts come
            from that set; verification is unchanged, so decoding stays lossless.
    """

    exit_head: ExitHeadMode = structural("shared")
    vocab_size: int | None = structural(None)

    def __post_init__(self) -> None:
        if self.vocab_size is not None and (isinstance(self.vocab_size, bool) or self.vocab_size < 1):
            raise ConfigError(f"draft.vocab_size must be >= 1 or null (the full vocabulary), got {self.vocab_size}")


@dataclass(frozen=True)
class LossSettings:
    """``loss = loss_main + beta_exit * loss_exit``.

    Args:
        beta_exit: weight of the exit loss. 0 (with ``detach_exit: false``) skips the draft path in
            training: plain LoRA fine-tuning of layers ``0..exit_layer``, the benchmark's baseline.
        exit_loss: ``ce`` (labels), ``kd`` (distil the full path, what Kangaroo trains with) or ``mix``.
        kd_weight: weight of ``kd`` within ``mix``.
        detach_exit: SGP. The deep layers get a detached input and run under ``no_grad``; False is the
            joint baseline where ``loss_main`` back-propagates into the shallow LoRA.
    """

    beta_exit: float = 0.7
    exit_loss: Literal["ce", "kd", "mix"] = "ce"
    kd_weight: float = 0.5
    detach_exit: bool = True

    def __post_init__(self) -> None:
        if self.beta_exit < 0:
            raise ConfigError(f"loss.beta_exit must be >= 0, got {self.beta_exit}")
        if self.exit_loss not in ("ce", "kd", "mix"):
            raise ConfigError(f"loss.exit_loss must be one of ce, kd, mix; got {self.exit_loss!r}")
        if not 0 <= self.kd_weight <= 1:
            raise ConfigError(f"loss.kd_weight must be in [0, 1], got {self.kd_weight}")


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW over exactly the trainable parameters, warm-up, then a decay (see :mod:`kangaroo_lit.optim`).

    Args:
        lr: peak learning rate.
        weight_decay: AdamW weight decay, on matrices only (not norms or biases).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps (optimizer steps).
        schedule: after warm-up: ``cosine`` decay to ``min_lr_ratio * lr``, ``linear``, or ``constant``.
        min_lr_ratio: floor of the decayed learning rate, as a fraction of the peak.
    """

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optimizer.schedule must be one of cosine, linear, constant; got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class DecodingSettings:
    """Self-speculative decoding in ``predict`` and in the decode checks (never part of training).

    Args:
        max_new_tokens: tokens to generate per prompt.
        threshold: a draft whose top-1 probability is below this ends the round (Kangaroo: 0.6); in [0, 1].
        max_draft: most tokens drafted per round (Kangaroo: 6).
        temperature: 0 = greedy, else lossless speculative sampling.
    """

    FREE_ON_RESUME: ClassVar[bool] = True

    max_new_tokens: int = 128
    threshold: float = 0.6
    max_draft: int = 6
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"decoding.threshold must be in [0, 1], got {self.threshold}")
        if self.max_draft < 1:
            raise ConfigError(f"decoding.max_draft must be >= 1, got {self.max_draft}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"decoding.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"decoding.temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class KangarooSettings:
    """Everything :class:`~kangaroo_lit.lit_module.KangarooLitModule` is built from (its arguments)."""

    base_model: str = structural()
    exit_layer: int = structural()
    dtype: str = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    lora: LoraSettings = field(default_factory=LoraSettings)
    draft: DraftSettings = field(default_factory=DraftSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    decoding: DecodingSettings = field(default_factory=DecodingSettings)

    def __post_init__(self) -> None:
        loss, lora = self.loss, self.lora
        if loss.beta_exit == 0 and (loss.detach_exit or lora.rank == 0 or lora.scope == "draft"):
            raise ConfigError(
                "loss.beta_exit=0 trains only through loss_main, which needs loss.detach_exit=false, "
                "lora.rank > 0 and lora.scope=shared (plain LoRA fine-tuning of the shallow layers); got "
                f"detach_exit={loss.detach_exit}, lora.rank={lora.rank}, lora.scope={lora.scope!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, numbers, strings): safe for ``torch.load(weights_only=True)``."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> KangarooSettings:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        return _build(cls, values, prefix="")


class ResumePolicy:
    """How a setting may differ between a checkpoint and the run that loads it."""

    STRUCTURAL = "structural"  # never: the trainable tensors would not fit or mean something else
    FIT = "fit"  # not when resuming fit (exactness); free in validate/test/predict
    FREE = "free"  # always free (decoding)


def resume_policy(cls: type = KangarooSettings, prefix: str = "") -> dict[str, str]:
    """``{"lora.rank": "structural", "decoding.threshold": "free", ...}`` for every leaf setting."""
    policies = {}
    for f in dataclasses.fields(cls):
        name, sub = prefix + f.name, _resolve(cls, f)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            policies.update(resume_policy(sub, name + "."))
        elif f.metadata.get(_STRUCTURAL):
            policies[name] = ResumePolicy.STRUCTURAL
        elif getattr(cls, "FREE_ON_RESUME", False):
            policies[name] = ResumePolicy.FREE
        else:
            policies[name] = ResumePolicy.FIT
    return policies


def structure_of(settings: KangarooSettings) -> dict[str, Any]:
    """The structural settings (dotted names): what a checkpoint must match."""
    flat = flatten(settings.to_dict())
    values = {k: flat[k] for k, p in resume_policy().items() if p == ResumePolicy.STRUCTURAL}
    if settings.lora.rank == 0:  # without LoRA its other settings shape nothing
        values.update({k: None for k in values if k.startswith("lora.") and k != "lora.rank"})
    return values


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"rank": 8}}`` -> ``{"lora.rank": 8}``."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# --------------------------------------------------------------------------------------------------


def _resolve(cls: type, f: dataclasses.Field) -> Any:
    # ``from __future__ import annotations`` leaves field types as strings: resolve nested settings.
    hint = f.type
    if isinstance(hint, str):
        hint = {c.__name__: c for c in _SETTINGS_TYPES}.get(hint, hint)
    return hint


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"setting {prefix.rstrip('.') or '<root>'} must be a mapping, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for name, value in values.items():
        sub = _resolve(cls, known[name])
        if dataclasses.is_dataclass(sub) and isinstance(sub, type):
            kwargs[name] = value if isinstance(value, sub) else _build(sub, value, f"{prefix}{name}.")
        elif name == "betas":
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


_SETTINGS_TYPES = (LoraSettings, DraftSettings, LossSettings, OptimizerSettings, DecodingSettings, KangarooSettings)
