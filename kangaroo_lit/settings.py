"""Typed settings of a Kangaroo run, grouped by meaning.

The LightningModule takes the base model and the exit layer plus one settings object per concern:

* :class:`LoraSettings`: LoRA on the shallow layers (``model.lora.*``);
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
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from kangaroo_lit.errors import ConfigError

if TYPE_CHECKING:  # the decoding package imports these settings; at run time it is imported lazily
    from kangaroo_lit.decoding.drafters import Drafter
    from kangaroo_lit.decoding.sampling import SamplingConfig

LoraScope = Literal["draft", "shared"]
ExitHeadMode = Literal["shared", "trainable"]
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the shallow layers ``0..exit_layer``.

    Fields marked ``structural`` define the trainable tensors: a checkpoint must match them
    (:mod:`kangaroo_lit.settings`).

    Args:
        rank: LoRA rank; 0 turns LoRA off (pure Kangaroo).
        alpha: scaling numerator (scale = alpha / rank).
        dropout: dropout on the LoRA input.
        target_modules: module names LoRA wraps (the Llama names also fit Mistral, Qwen2 and Qwen3).
        scope: ``draft`` (LoRA only on the draft path; the verifier stays the untouched base) or
            ``shared`` (LoRA in both paths, the original SGP code; lossless only w.r.t. the merged model).
    """

    rank: int = field(default=8, metadata={"structural": True})
    alpha: float = field(default=16.0, metadata={"structural": True})
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: list(LLAMA_TARGET_MODULES), metadata={"structural": True}
    )
    scope: LoraScope = field(default="draft", metadata={"structural": True})

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"lora.rank must be >= 0 (0 = no LoRA), got {self.rank}")
        if self.scope not in ("draft", "shared"):
            raise ConfigError(f"lora.scope must be 'draft' or 'shared', got {self.scope!r}")

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
        adapter_mlp: intermediate width of an MLP block added to the adapter after its attention (the
            base architecture's gated MLP; EAGLE's drafter is a whole layer); 0 = none (Kangaroo). It
            costs about ``3 d * adapter_mlp`` multiply-adds a draft token.
    """

    exit_head: ExitHeadMode = structural("shared")
    vocab_size: int | None = structural(None)
    adapter_mlp: int = structural(0)

    def __post_init__(self) -> None:
        if self.vocab_size is not None and (isinstance(self.vocab_size, bool) or self.vocab_size < 1):
            raise ConfigError(f"draft.vocab_size must be >= 1 or null (the full vocabulary), got {self.vocab_size}")
        if isinstance(self.adapter_mlp, bool) or self.adapter_mlp < 0:
            raise ConfigError(f"draft.adapter_mlp must be >= 0 (0 = no MLP), got {self.adapter_mlp}")


@dataclass(frozen=True)
class LossSettings:
    """``loss = loss_main + beta_exit * loss_exit``.

    Args:
        beta_exit: weight of the exit loss. 0 (with ``detach_exit: false``) skips the draft path in
            training: plain LoRA fine-tuning of layers ``0..exit_layer``, the benchmark's baseline.
        exit_loss: ``ce`` (labels), ``kd`` (distil the full path, what Kangaroo trains with), ``mix``, or
            ``accept``: ``1 - sum_v min(p_full, q_draft)``, one minus the probability that a sampled draft is
            accepted (the total variation distance; DistillSpec's TVD), the quantity decoding pays for.
        kd_weight: weight of ``kd`` within ``mix``.
        detach_exit: SGP. The deep layers get a detached input and run under ``no_grad``; False is the
            joint baseline where ``loss_main`` back-propagates into the shallow LoRA.
    """

    beta_exit: float = 0.7
    exit_loss: Literal["ce", "kd", "mix", "accept"] = "ce"
    kd_weight: float = 0.5
    detach_exit: bool = True

    def __post_init__(self) -> None:
        if self.beta_exit < 0:
            raise ConfigError(f"loss.beta_exit must be >= 0, got {self.beta_exit}")
        if self.exit_loss not in ("ce", "kd", "mix", "accept"):
            raise ConfigError(f"loss.exit_loss must be one of ce, kd, mix, accept; got {self.exit_loss!r}")
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


# The streaming CPU kernel multiplies at most this many input rows at once (kangaroo_lit.kernels.streaming_linear);
# a verification pass covers the drafts plus the round's first token.
KERNEL_MAX_ROWS = 8
KERNELS = ("eager", "streaming")
# Where drafts come from (kangaroo_lit.decoding.drafters): the trained adapter (with prompt lookup where it
# matches, when prompt_lookup > 0), or prompt lookup alone.
DRAFTER_KINDS = ("adapter", "lookup", "tree")
LOOKUP_WINDOWS = ("cost", "fixed")


@dataclass(frozen=True)
class DecodingSettings:
    """How the self-speculative decoder decodes (never part of training).

    Args:
        max_new_tokens: tokens to generate per prompt (>= 1).
        threshold: a draft whose top-1 probability is below this ends the round (Kangaroo: 0.6); in [0, 1]
            (0: always draft ``max_draft``; 1: draft one token a round).
        max_draft: most tokens drafted per round by the adapter (Kangaroo: 6); >= 1.
        prompt_lookup: most tokens a round copies from an earlier occurrence of the context's last n-gram
            (prompt lookup; 0 = off); >= 0.
        drafter: ``adapter`` (the trained draft, a chain; with ``prompt_lookup`` > 0, lookup where it
            matches), ``tree`` (the trained draft, a tree of candidates sized by the cost model; with
            ``prompt_lookup`` > 0, lookup where it matches) or ``lookup`` (prompt lookup alone: a round
            without a match is a plain step).
        temperature: 0 = greedy, else lossless speculative sampling at this temperature (>= 0).
        top_p: nucleus sampling mass, in (0, 1] (1 = off).
        top_k: top-k sampling, >= 0 (0 = off).
        kernel: linear layers over <= 8 rows: ``eager`` (``F.linear``) or ``streaming`` (the CPU float32
            kernel: a verification pass for about the price of one step).
        skip_below: a round whose first adapter draft has a confidence below this verifies no draft (a
            plain step: the wider verification pass is saved); in [0, 1], 0 = off. Break-even is about
            ``v_2 - 1`` of ``bench cost_model``; with a calibrated draft (``kangaroo-lit calibrate``) the
            confidence is an acceptance probability.
        tree_width: ``tree`` drafter: candidates per expanded node and nodes expanded per level (>= 1).
        tree_nodes: ``tree`` drafter: most nodes verified a round (>= 1; the cost model picks how many).
        tree_depth: ``tree`` drafter: most levels below the last committed token (>= 1).
        cost_model: a ``bench cost_model`` JSON report (``decode_cost_*.json``) of the device to size trees
            and lookup windows by; None = the built-in table for the device and kernel.
        lookup_window: ``cost`` (each round verifies as many of the ``prompt_lookup`` copied tokens as the cost
            model and this output's running acceptance say pay, possibly none) or ``fixed`` (all the match
            offers, up to ``prompt_lookup``).
    """

    FREE_ON_RESUME: ClassVar[bool] = True  # a resumed training run may change how it decodes

    max_new_tokens: int = 128
    threshold: float = 0.6
    max_draft: int = 6
    prompt_lookup: int = 0
    drafter: Literal["adapter", "tree", "lookup"] = "adapter"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    kernel: Literal["eager", "streaming"] = "eager"
    skip_below: float = 0.0
    tree_width: int = 4
    tree_nodes: int = 7
    tree_depth: int = 6
    cost_model: str | None = None
    lookup_window: Literal["cost", "fixed"] = "cost"

    def __post_init__(self) -> None:
        self.check("decoding.")

    def check(self, prefix: str) -> None:
        """Raise :class:`ConfigError` for the first value out of range, naming it ``prefix + field``."""
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"{prefix}{name} must be {rule}, got {getattr(self, name)!r}")

        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", ">= 1")
        if not 0 <= self.threshold <= 1:
            raise bad("threshold", "in [0, 1]")
        if self.max_draft < 1:
            raise bad("max_draft", ">= 1")
        if self.prompt_lookup < 0:
            raise bad("prompt_lookup", ">= 0 (tokens; 0 = off)")
        if self.drafter not in DRAFTER_KINDS:
            raise bad("drafter", f"one of {', '.join(DRAFTER_KINDS)}")
        if self.drafter == "lookup" and self.prompt_lookup < 1:
            raise ConfigError(f"{prefix}drafter lookup needs {prefix}prompt_lookup >= 1 (tokens copied per round)")
        if self.temperature < 0:
            raise bad("temperature", ">= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1] (1 = off)")
        if self.top_k < 0:
            raise bad("top_k", ">= 0 (0 = off)")
        if not 0 <= self.skip_below <= 1:
            raise bad("skip_below", "in [0, 1] (0 = off)")
        for name in ("tree_width", "tree_nodes", "tree_depth"):
            if getattr(self, name) < 1:
                raise bad(name, ">= 1")
        if self.kernel not in KERNELS:
            raise bad("kernel", f"one of {', '.join(KERNELS)}")
        if self.lookup_window not in LOOKUP_WINDOWS:
            raise bad("lookup_window", f"one of {', '.join(LOOKUP_WINDOWS)}")
        if self.kernel == "streaming":
            drafted = {"adapter": self.max_draft, "tree": self.tree_nodes, "lookup": 0}[self.drafter]
            rows = 1 + max(self.prompt_lookup, drafted)
            if rows > KERNEL_MAX_ROWS:
                draft_option = "tree_nodes" if self.drafter == "tree" else "max_draft"
                raise ConfigError(
                    f"{prefix}kernel streaming verifies at most {KERNEL_MAX_ROWS} tokens a pass, but "
                    f"{prefix}{draft_option} {drafted} / {prefix}prompt_lookup {self.prompt_lookup} make "
                    f"passes of {rows}; use at most {KERNEL_MAX_ROWS - 1} drafted or copied tokens")

    @classmethod
    def for_options(cls, prefix: str = "--", **values) -> DecodingSettings:
        """Build and check with errors worded for the caller's options (``--threshold`` on a command line)."""
        known = {f.name for f in dataclasses.fields(cls)}
        settings = object.__new__(cls)
        for f in dataclasses.fields(cls):
            object.__setattr__(settings, f.name, values.get(f.name, f.default))
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"unknown decoding settings {sorted(unknown)}")
        settings.check(prefix)
        return settings

    @property
    def sampling(self) -> SamplingConfig:
        """The sampling rule (greedy at temperature 0)."""
        from kangaroo_lit.decoding.sampling import SamplingConfig

        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def make_drafter(self, model=None, prompt_lookup_ngram: tuple[int, int] = (2, 3)) -> Drafter:
        """The drafter these settings describe for ``model`` (a tree drafter reads its device and exit layer)."""
        from kangaroo_lit.decoding.drafters import make_drafter

        return make_drafter(self.drafter, self.threshold, self.max_draft, self.prompt_lookup, prompt_lookup_ngram,
                            skip_below=self.skip_below, tree_width=self.tree_width, tree_nodes=self.tree_nodes,
                            tree_depth=self.tree_depth,
                            cost=self.decode_cost(model) if self.drafter == "tree" else None,
                            lookup_cost=self.lookup_cost(model))

    def lookup_cost(self, model=None):
        """The cost model prompt lookup sizes its window by (:meth:`decode_cost`); None without lookup or with
        ``lookup_window: fixed``."""
        return self.decode_cost(model) if self.prompt_lookup and self.lookup_window == "cost" else None

    def decode_cost(self, model=None):
        """The :class:`~kangaroo_lit.decoding.cost.DecodeCost` trees and lookup windows are sized by:
        ``cost_model``'s report for the model's exit layer, else the built-in table of the model's device
        and kernel (CPU without a model)."""
        from kangaroo_lit.decoding.cost import DecodeCost, default_cost

        if self.cost_model:
            if model is None:
                raise ValueError("a cost_model report is read for a model's exit layer: pass the model")
            return DecodeCost.from_report(self.cost_model, model.exit_layer)
        device = "cpu" if model is None else next(model.parameters()).device.type
        return default_cost(device, self.kernel)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# Every field changes what is decoded or how fast: a resumed benchmark must match them all.
DECODING_ANSWER_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DecodingSettings))


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
