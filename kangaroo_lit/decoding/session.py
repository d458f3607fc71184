"""Load a model to decode with: the one loader every decoding front-end can call.

``load_for_decoding`` turns "an exported artifact" or "a base model + an exit layer" (an untrained
adapter: the machinery on any supported model, lossless but with little acceleration) into the
:class:`~kangaroo_lit.model.KangarooModel`, its tokenizer and the base model's resolved location, in
eval mode with every parameter frozen. It decodes nothing and touches no global state (threads,
seeds, kernels stay the caller's business).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from kangaroo_lit.errors import ConfigError, ModelSourceError
from kangaroo_lit.model import KangarooModel
from kangaroo_lit.settings import DecodingSettings


@dataclass
class LoadedForDecoding:
    """What :func:`load_for_decoding` returns.

    Attributes:
        model: the KangarooModel, eval mode, frozen.
        tokenizer: the base model's tokenizer; None only when the base was given as a loaded model
            whose ``name_or_path`` holds no tokenizer files.
        base_path: where the base model was loaded from (``model:`` / ``embedded:`` names resolved), or
            the given model's ``name_or_path``.
        manifest: the artifact's checked ``kangaroo.json`` (None without an artifact).
    """

    model: KangarooModel
    tokenizer: Any
    base_path: str
    manifest: dict[str, Any] | None = None


def _resolve(name: str) -> str:
    from kangaroo_lit.embedded import resolve_path

    try:
        return resolve_path(name)
    except FileNotFoundError as err:  # an unknown embedded: asset
        raise ModelSourceError(str(err)) from None


def _tokenizer_of(path: str) -> Any:
    from kangaroo_lit.architectures import load_tokenizer

    return load_tokenizer(path)


def _tokenizer_of_loaded(model: PreTrainedModel, recorded: str | None) -> Any:
    """The tokenizer beside a given loaded model (its ``name_or_path``, else the artifact's base), or None."""
    from kangaroo_lit.architectures import TOKENIZER_FILES

    for candidate in (str(getattr(model, "name_or_path", "") or ""), recorded):
        if not candidate:
            continue
        try:
            path = _resolve(candidate)
        except ModelSourceError:
            continue
        if path and Path(path).is_dir() and any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            return _tokenizer_of(path)
    return None


def load_for_decoding(
    artifact: str | Path | None = None,
    base_model: str | PreTrainedModel | None = None,
    exit_layer: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> LoadedForDecoding:
    """Load what decoding needs, from an artifact or from a base model and an exit layer.

    Args:
        artifact: directory written by ``kangaroo-lit export`` (the trained draft).
        base_model: with ``artifact``, overrides the base it records (a name, a path, or ``model:`` /
            ``embedded:`` short names); without, the model to decode with an untrained adapter (needs
            ``exit_layer``). Either way it may also be an HF causal LM already loaded: the draft is built
            on it (its weights shared, not copied) and ``dtype`` / ``device`` are its own.
        exit_layer: L for a plain ``base_model``; with an artifact it must be the recorded one (or None).
        dtype: dtype of the whole model (default: the artifact's, float32 for a plain base model).
        device: where to put it (default CPU).

    Returns:
        A :class:`LoadedForDecoding` (model, tokenizer, base_path, manifest); an artifact's LoRA is folded
        into plain layers for decoding (:meth:`KangarooModel.merge_lora_for_decoding`), except a shared-scope
        LoRA on a given loaded model (folding it would change that model's own weights).

    Raises:
        ConfigError: neither an artifact nor a base model, a plain base without ``exit_layer``, an exit
            layer other than the artifact's, or a dtype other than a given loaded model's.
        CheckpointError / ModelSourceError: a malformed artifact, or a base model that cannot be loaded
            (one line each, from :mod:`kangaroo_lit.artifact` / :mod:`kangaroo_lit.architectures`).
    """
    if artifact is not None:
        return _from_artifact(Path(artifact), base_model, exit_layer, dtype, device)
    if base_model is None:
        raise ConfigError("give an artifact, or a base model with an exit layer")
    if exit_layer is None:
        raise ConfigError("a base model without an artifact needs an exit layer (an untrained adapter)")
    if exit_layer < 0:
        raise ConfigError(f"exit layer must be >= 0, got {exit_layer}")
    return _from_base(base_model, exit_layer, dtype, device)


def _from_artifact(artifact: Path, base_model, exit_layer, dtype, device) -> LoadedForDecoding:
    from kangaroo_lit.artifact import load_artifact, read_manifest

    manifest = read_manifest(artifact)
    if exit_layer is not None and exit_layer != manifest["exit_layer"]:
        raise ConfigError(f"exit layer {exit_layer}: the artifact {artifact} was trained for exit layer "
                          f"{manifest['exit_layer']} (leave the exit layer out)")
    if isinstance(base_model, PreTrainedModel):
        model = load_artifact(artifact, dtype=dtype, base_model=base_model)
        if model.lora_scope != "shared":  # a shared LoRA would be merged into the caller's own weights
            model.merge_lora_for_decoding()  # the caller's model comes back without LoRA modules
        base_path = str(getattr(base_model, "name_or_path", "") or "")
        return LoadedForDecoding(model, _tokenizer_of_loaded(base_model, manifest["base_model"]), base_path, manifest)
    # The tokenizer first: quick to load, or to fail.
    base_path = _resolve(base_model or manifest["base_model"])
    tokenizer = _tokenizer_of(base_path)
    model = load_artifact(artifact, dtype=dtype, device=None if device is None else str(device), base_model=base_model)
    model.merge_lora_for_decoding()
    return LoadedForDecoding(model, tokenizer, base_path, manifest)


def _from_base(base_model, exit_layer: int, dtype, device) -> LoadedForDecoding:
    from kangaroo_lit.architectures import check_model_source, load_base_model, resolve_dtype

    if isinstance(base_model, PreTrainedModel):
        base, tokenizer = base_model, _tokenizer_of_loaded(base_model, None)
        base_path = str(getattr(base_model, "name_or_path", "") or "")
        if dtype is not None and resolve_dtype(dtype) != base.dtype:
            raise ConfigError(f"dtype {dtype}: the given base model is {base.dtype}; a draft built on a loaded "
                              "model takes its dtype")
        device = base.device
    else:
        base_path = _resolve(base_model)
        check_model_source(base_path)  # a missing directory says so before the tokenizer says less
        tokenizer = _tokenizer_of(base_path)
        base = load_base_model(base_path, resolve_dtype(dtype or "float32"))
    model = KangarooModel(base, exit_layer, trainable_dtype=base.dtype)
    model.to(device or "cpu").eval().requires_grad_(False)
    return LoadedForDecoding(model, tokenizer, base_path, None)


# The settings ``bench threshold_curve --record`` derives from the cost model and writes to ``kangaroo.json``.
SIZING_FIELDS = ("threshold", "max_draft", "skip_below")


def recorded_decoding(manifest: dict[str, Any] | None) -> DecodingSettings:
    """The decoding settings an artifact records, over the defaults of :class:`DecodingSettings`: its training
    run's (``training.model.decoding``), then the chain sizing the cost model derived for it (``sizing``,
    written by ``kangaroo-lit bench threshold_curve --record``); fields it does not know are ignored, a bad
    value is refused."""
    import dataclasses

    recorded = dict((((manifest or {}).get("training") or {}).get("model") or {}).get("decoding") or {})
    sizing = (manifest or {}).get("sizing") or {}
    recorded.update({k: sizing[k] for k in SIZING_FIELDS if k in sizing})
    known = {f.name for f in dataclasses.fields(DecodingSettings)}
    values = {k: v for k, v in recorded.items() if k in known}
    return DecodingSettings.for_options("decoding.", **values)


def recorded_sizing(manifest: dict[str, Any] | None, **given: Any) -> dict[str, Any]:
    """The chain sizing (:data:`SIZING_FIELDS`) to decode with: each value ``given`` that is not None (a flag
    wins), else the one ``manifest`` records (:func:`recorded_decoding`), else :class:`DecodingSettings`' default."""
    recorded = recorded_decoding(manifest)
    return {k: getattr(recorded, k) if given.get(k) is None else given[k] for k in SIZING_FIELDS}
