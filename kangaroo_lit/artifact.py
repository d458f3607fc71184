"""Export a trained draft as a self-describing directory, and load it back (DESIGN §4b).

Layout of an artifact directory::

    kangaroo.json                   base model, exit layer, LoRA / adapter / head configuration, dtype,
                                    training configuration, versions, git revision
    lora/                           PEFT ``save_pretrained`` (only when LoRA is on)
    kangaroo_adapter.safetensors    the adapter's weights
    exit_head.safetensors           only when the exit head is trainable
    README.md                       a model card

The base weights are referenced (Hub name or local path), never copied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kangaroo_lit.architectures import load_base_model, resolve_dtype
from kangaroo_lit.embedded import PREFIX, resolve_path
from kangaroo_lit.model import KangarooModel, LoraSettings
from kangaroo_lit.run_info import git_revision, package_versions

FORMAT_VERSION = 1
MANIFEST = "kangaroo.json"
ADAPTER_FILE = "kangaroo_adapter.safetensors"
HEAD_FILE = "exit_head.safetensors"
LORA_DIR = "lora"


def _portable_base_name(name: str) -> str:
    """Hub names and ``embedded:`` assets stay as they are; an existing local path becomes absolute."""
    if name.startswith(PREFIX):
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _cpu_contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def manifest_for(model: KangarooModel, base_model: str, dtype: str, training: dict[str, Any] | None = None,
                 metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """The ``kangaroo.json`` content describing ``model``."""
    cfg = model.config
    attn = model.adapter.self_attn
    lora = model.lora_settings
    return {
        "format_version": FORMAT_VERSION,
        "base_model": _portable_base_name(base_model),
        "model_type": cfg.model_type,
        "num_layers": model.num_layers,
        "exit_layer": model.exit_layer,
        "dtype": dtype,
        "lora": None if lora is None else {
            "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
            "target_modules": list(lora.target_modules), "scope": lora.scope,
            "layers": list(range(model.exit_layer + 1)),
        },
        "adapter": {
            "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": attn.head_dim,
            "layer_type": model.adapter.layer_type,
            "parameters": sum(p.numel() for p in model.adapter.parameters()),
        },
        "exit_head": model.exit_head_mode,
        "training": training or {},
        "metrics": metrics or {},
        "versions": package_versions(),
        "git_revision": git_revision(),
    }


def save_artifact(model: KangarooModel, out_dir: str | Path, base_model: str, dtype: str = "float32",
                  training: dict[str, Any] | None = None, metrics: dict[str, float] | None = None) -> Path:
    """Write the artifact of ``model`` to ``out_dir`` (created; existing files are overwritten)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = manifest_for(model, base_model, dtype, training, metrics)
    save_file(_cpu_contiguous(model.adapter.state_dict()), str(out / ADAPTER_FILE))
    if model.exit_proj is not None:
        save_file(_cpu_contiguous(model.exit_proj.state_dict()), str(out / HEAD_FILE))
    if model.has_lora:
        model.base.save_pretrained(str(out / LORA_DIR))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    (out / "README.md").write_text(model_card(manifest))
    return out


def model_card(manifest: dict[str, Any]) -> str:
    """A short model card (Markdown) from the manifest."""
    lora = manifest["lora"]
    lora_line = (f"LoRA rank {lora['rank']} (alpha {lora['alpha']}) on layers 0..{manifest['exit_layer']}, "
                 f"targets {', '.join(lora['target_modules'])}, scope `{lora['scope']}`" if lora else "no LoRA")
    scope_note = ("the untouched base model, so decoding is lossless with respect to it"
                  if not lora or lora["scope"] == "draft"
                  else "the base with this LoRA merged (lossless with respect to the fine-tuned model)")
    training = manifest.get("training") or {}
    data = training.get("data") or {}
    data_line = data.get("data_path") or data.get("dataset_name") or "unknown"
    lines = [
        f"# Kangaroo draft for `{manifest['base_model']}`",
        "",
        "A self-speculative draft made with kangaroo_lit: the base model's shallow layers "
        f"0..{manifest['exit_layer']} + a Kangaroo adapter ({manifest['adapter']['parameters']:,} parameters) "
        f"+ the {'trainable' if manifest['exit_head'] == 'trainable' else 'shared'} exit head. {lora_line}.",
        f"The verifier is {scope_note}.",
        "",
        f"* Base model: `{manifest['base_model']}` ({manifest['model_type']}, {manifest['num_layers']} layers); "
        "its weights are not included.",
        f"* Training data: `{data_line}`",
        f"* Trained for {training.get('global_step', '?')} steps (epoch {training.get('epoch', '?')}).",
        f"* kangaroo_lit git revision: `{manifest.get('git_revision')}`",
    ]
    if manifest.get("metrics"):
        lines += ["", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(manifest["metrics"].items())]
    lines += ["", "Decode with: `kangaroo-lit generate --artifact <this dir> --prompt \"...\"`", ""]
    return "\n".join(lines)


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    """Parse ``kangaroo.json`` with a clear error when the directory is not an artifact."""
    path = Path(artifact_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{artifact_dir} is not a kangaroo_lit artifact: {MANIFEST} is missing")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r}, this kangaroo_lit reads "
                         f"{FORMAT_VERSION}")
    return manifest


def load_artifact(artifact_dir: str | Path, dtype: str | torch.dtype | None = None, device: str | None = None,
                  base_model: str | None = None) -> KangarooModel:
    """Rebuild the :class:`KangarooModel` of an artifact, in eval mode.

    Args:
        dtype: dtype of the whole model (base and trainable parts); default the manifest's.
        device: where to put it (default CPU).
        base_model: override the base model's name or path (e.g. a local copy of the Hub model).
    """
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    torch_dtype = resolve_dtype(dtype or manifest["dtype"])
    base = load_base_model(resolve_path(base_model or manifest["base_model"]), torch_dtype)
    lora = None
    if manifest["lora"]:
        m = manifest["lora"]
        lora = LoraSettings(rank=m["rank"], alpha=m["alpha"], dropout=m["dropout"],
                            target_modules=list(m["target_modules"]), scope=m["scope"])
    model = KangarooModel(base, manifest["exit_layer"], lora=lora, exit_head=manifest["exit_head"],
                          trainable_dtype=torch_dtype)
    model.adapter.load_state_dict(load_file(str(artifact_dir / ADAPTER_FILE)))
    if model.exit_proj is not None:
        model.exit_proj.load_state_dict(load_file(str(artifact_dir / HEAD_FILE)))
    if model.has_lora:
        from peft import set_peft_model_state_dict

        lora_state = load_file(str(artifact_dir / LORA_DIR / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model.base, lora_state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{artifact_dir / LORA_DIR}: LoRA tensors that fit no module: {unexpected[:5]}")
    model.to(device or "cpu")
    model.requires_grad_(False)
    return model.eval()


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Lightning checkpoint -> artifact directory (the base model is rebuilt from its name/path)."""
    import dataclasses

    from kangaroo_lit.checkpointing import saved_settings
    from kangaroo_lit.lit_module import KangarooLitModule

    ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=True)
    settings = saved_settings(ckpt, source=str(ckpt_path))
    if base_model is not None:
        settings = dataclasses.replace(settings, base_model=base_model)
    module = KangarooLitModule.from_settings(settings)
    module.configure_model()
    module.on_load_checkpoint(ckpt)  # refuses a checkpoint of another configuration
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if unexpected:
        raise ValueError(f"{ckpt_path}: tensors that fit no parameter: {unexpected[:5]}")
    training = {
        "model": settings.to_dict(),
        "data": ckpt.get("datamodule_hyper_parameters"),
        "global_step": ckpt.get("global_step"),
        "epoch": ckpt.get("epoch"),
        "checkpoint": str(Path(ckpt_path).resolve()),
    }
    return save_artifact(module.model, out_dir, settings.base_model, settings.dtype,
                         training=training, metrics=ckpt.get("kangaroo_metrics"))
