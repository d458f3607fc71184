"""Export a trained draft as a self-describing directory, and load it back (DESIGN §4b).

Layout of an artifact directory::

    kangaroo.json                   base model, exit layer, LoRA / adapter / head configuration, dtype,
                                    training configuration, versions, git revision
    lora/                           PEFT ``save_pretrained`` (only when LoRA is on)
    kangaroo_adapter.safetensors    the adapter's weights
    exit_head.safetensors           only when the exit head is trainable
    draft_vocab.safetensors         only with a restricted draft head (``draft.vocab_size`` K): the K
                                    token ids (int64 ``draft_vocab``) its rows score
    README.md                       a model card

The base weights are referenced (Hub name or local path), never copied.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from kangaroo_lit.architectures import load_base_model, looks_like_local_path, resolve_dtype
from kangaroo_lit.draft_vocab import check_draft_vocab
from kangaroo_lit.embedded import PREFIX, resolve_path
from kangaroo_lit.errors import CheckpointError, ConfigError, KangarooError, ModelSourceError
from kangaroo_lit.model import KangarooModel
from kangaroo_lit.run_info import git_revision, package_versions
from kangaroo_lit.settings import LoraSettings

FORMAT_VERSION = 1
MANIFEST = "kangaroo.json"
ADAPTER_FILE = "kangaroo_adapter.safetensors"
HEAD_FILE = "exit_head.safetensors"
DRAFT_VOCAB_FILE = "draft_vocab.safetensors"
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
            "mlp_width": model.adapter.mlp_width,
            "parameters": sum(p.numel() for p in model.adapter.parameters()),
        },
        "exit_head": model.exit_head_mode,
        "draft_vocab_size": model.draft_vocab_size,
        "training": training or {},
        "metrics": metrics or {},
        "versions": package_versions(),
        "git_revision": git_revision(),
    }


def check_out_dir(out_dir: str | Path, overwrite: bool = False, keep: tuple[str | Path | None, ...] = ()) -> Path:
    """The artifact directory to write, refused when writing it would lose something.

    An existing non-empty directory needs ``overwrite``; with it, the directory must not hold any of
    ``keep`` (the checkpoint being exported, the base model), which replacing it would delete.

    Raises:
        ConfigError: naming the directory and what to do.
    """
    out = Path(os.path.abspath(Path(out_dir).expanduser()))  # "." and "x/.." get a real name and parent
    if out.is_symlink():
        out = Path(os.path.realpath(out))  # replace the directory the link points to, keep the link
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out_dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out_dir {out} exists and is not empty; pass --overwrite to replace it (everything "
                              "in it is deleted) or choose another directory")
        root = out.resolve()
        for item in keep:
            if item is None or not looks_like_local_path(str(item)) or not Path(item).expanduser().exists():
                continue
            path = Path(item).expanduser().resolve()
            if path == root or root in path.parents:
                raise ConfigError(f"--out_dir {out} holds {path}, which --overwrite would delete; choose another "
                                  "directory")
    return out


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; an old ``out`` is moved aside first and deleted last."""
    check_out_dir(out, overwrite)  # again: something may have appeared there while the artifact was written
    if not out.exists():
        tmp.rename(out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)


def save_artifact(model: KangarooModel, out_dir: str | Path, base_model: str, dtype: str = "float32",
                  training: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
                  overwrite: bool = False) -> Path:
    """Write the artifact of ``model`` to ``out_dir``, all or nothing.

    The files are written to a temporary directory beside ``out_dir`` (same file system) that is
    renamed to ``out_dir`` only when complete, so an interrupted export leaves no half artifact and
    never mixes old files with new ones.

    Args:
        overwrite: replace an existing non-empty ``out_dir`` (it is moved aside, the new artifact renamed
            in, then the old one deleted); without it such a directory is refused.

    Raises:
        ConfigError: ``out_dir`` is a file, or a non-empty directory without ``overwrite``, or ``model`` had
            its LoRA folded for decoding (its LoRA weights no longer exist apart from the layers).
    """
    if model.lora_merged:
        # PEFT's save_pretrained on the unloaded base would write the whole base model as "LoRA" and lose
        # the draft's low-rank weights: refuse rather than write a wrong artifact.
        raise ConfigError("save_artifact: this model's LoRA was folded into its layers for decoding "
                          "(merge_lora_for_decoding, done by load_for_decoding); export from the training "
                          "checkpoint (`kangaroo-lit export`) or copy the artifact it was loaded from")
    out = check_out_dir(out_dir, overwrite, keep=(base_model,))
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = manifest_for(model, base_model, dtype, training, metrics)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(_cpu_contiguous(model.adapter.state_dict()), str(tmp / ADAPTER_FILE))
        if model.exit_proj is not None:
            save_file(_cpu_contiguous(model.exit_proj.state_dict()), str(tmp / HEAD_FILE))
        if model.draft_vocab is not None:
            save_file(_cpu_contiguous({"draft_vocab": model.draft_vocab.to(torch.int64)}), str(tmp / DRAFT_VOCAB_FILE))
        if model.has_lora:
            model.base.save_pretrained(str(tmp / LORA_DIR))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(model_card(manifest))
        from kangaroo_lit.hf.artifact_generate import write_custom_generate

        write_custom_generate(tmp)  # model.generate(..., custom_generate=<artifact>, trust_remote_code=True)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def base_license(base_model: str) -> str | None:
    """The base model's license where known: its model card's YAML ``license:``, or the registry entry of a
    model ``kangaroo-lit pull`` fetched (``model:<name>``, or a pulled directory); None when unknown."""
    from kangaroo_lit import model_zoo

    name = base_model[len("model:"):] if base_model.startswith("model:") else None
    try:
        path = Path(resolve_path(base_model))
    except (FileNotFoundError, KangarooError):
        path = None
    if path is not None and (path / "README.md").is_file():
        text = (path / "README.md").read_text(errors="replace")
        if text.startswith("---"):
            for line in text.split("\n---", 1)[0].splitlines():
                if line.strip().startswith("license:"):
                    return line.split(":", 1)[1].strip().strip("'\"") or None
    if path is not None and (path / model_zoo.MANIFEST).is_file():
        name = _read_json_object(path / model_zoo.MANIFEST).get("name", name)
    spec = model_zoo.REGISTRY.get(name or "")
    return spec.license.lower() if spec is not None else None


def _yaml_front_matter(manifest: dict[str, Any], license_name: str | None, datasets: list[str]) -> list[str]:
    from kangaroo_lit import model_zoo

    base = manifest["base_model"]
    if base.startswith("model:") and base[len("model:"):] in model_zoo.REGISTRY:
        base = model_zoo.REGISTRY[base[len("model:"):]].upstream  # the Hub id a pulled model comes from
    lines = ["---", f"base_model: {json.dumps(base)}", "library_name: kangaroo_lit", "pipeline_tag: text-generation",
             "tags:", "  - kangaroo_lit", "  - speculative-decoding", "  - self-speculative-decoding",
             "  - custom_generate"]
    if license_name:
        lines.append(f"license: {license_name}")
    if datasets:
        lines += ["datasets:"] + [f"  - {json.dumps(d)}" for d in datasets]
    return lines + ["---", ""]


def _measured_lines(measured: dict[str, Any] | None) -> list[str]:
    """The measured speed section: figures with the command that produced them, or "not measured"."""
    if not measured:
        return ["## Measured speed", "", "Not measured. `kangaroo-lit specbench --artifact <this dir>` measures "
                "acceptance and speedup over plain decoding on your hardware.", ""]
    lines = ["## Measured speed", ""]
    lines += [f"* {key}: {value}" for key, value in measured.items() if key != "command"]
    if measured.get("command"):
        lines += ["", "Measured by:", "", "```bash", measured["command"], "```"]
    return lines + [""]


def model_card(manifest: dict[str, Any], measured: dict[str, Any] | None = None,
               license_name: str | None = None) -> str:
    """The artifact's model card (Markdown with Hub YAML metadata) from the manifest.

    Args:
        measured: acceptance / speedup figures and the ``command`` that produced them (else the card says
            "not measured").
        license_name: the base model's license; default :func:`base_license` of the manifest's base.
    """
    lora = manifest["lora"]
    lora_line = (f"LoRA rank {lora['rank']} (alpha {lora['alpha']}) on layers 0..{manifest['exit_layer']}, "
                 f"targets {', '.join(lora['target_modules'])}, scope `{lora['scope']}`" if lora else "no LoRA")
    scope_note = ("the untouched base model, so decoding is lossless with respect to it"
                  if not lora or lora["scope"] == "draft"
                  else "the base with this LoRA merged (lossless with respect to the fine-tuned model)")
    training = manifest.get("training") or {}
    data = training.get("data") or {}
    data_line = data.get("data_path") or data.get("dataset_name") or "unknown"
    if license_name is None:
        license_name = base_license(manifest["base_model"])
    datasets = [d for d in (data.get("dataset_name"),) if d]
    lines = _yaml_front_matter(manifest, license_name, datasets) + [
        f"# Kangaroo draft for `{manifest['base_model']}`",
        "",
        "A self-speculative draft made with kangaroo_lit: the base model's shallow layers "
        f"0..{manifest['exit_layer']} + a Kangaroo adapter ({manifest['adapter']['parameters']:,} parameters"
        + (f", with an MLP of width {manifest['adapter']['mlp_width']}" if manifest['adapter'].get('mlp_width') else "")
        + ") "
        f"+ the {'trainable' if manifest['exit_head'] == 'trainable' else 'shared'} exit head"
        + (f" over the {manifest['draft_vocab_size']} most frequent training tokens" if manifest.get("draft_vocab_size")
           else "") + f". {lora_line}.",
        f"The verifier is {scope_note}.",
        "",
        f"* Base model: `{manifest['base_model']}` ({manifest['model_type']}, {manifest['num_layers']} layers); "
        "its weights are not included.",
        f"* Training data: `{data_line}`",
        f"* Trained for {training.get('global_step', '?')} steps (epoch {training.get('epoch', '?')}).",
        f"* kangaroo_lit git revision: `{manifest.get('git_revision')}`",
        f"* License: {license_name or 'not known here: see the base model'} (the base model's).",
    ]
    if manifest.get("metrics"):
        lines += ["", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(manifest["metrics"].items())]
    lines += ["", *_measured_lines(measured), *_usage_lines(manifest)]
    return "\n".join(lines)


def _usage_lines(manifest: dict[str, Any]) -> list[str]:
    base = manifest["base_model"]
    return [
        "## Decode with it", "",
        "The output is the base model's own: greedy decoding gives the same tokens as plain `generate`, sampling "
        "the same distribution. Needs `pip install kangaroo_lit`.", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained(\"<the base model: {base}>\")",
        "tokenizer = AutoTokenizer.from_pretrained(\"<the base model>\")",
        "inputs = tokenizer(\"Once upon a time\", return_tensors=\"pt\")",
        "out = model.generate(**inputs, max_new_tokens=64, custom_generate=\"<this folder>\", trust_remote_code=True)",
        "```", "",
        "or `from kangaroo_lit import load_draft; draft = load_draft(\"<this folder>\")` (then `draft.generate(ids)`), "
        "or `kangaroo-lit generate --artifact <this folder> --prompt \"...\"`.", "",
    ]


def write_model_card(artifact_dir: str | Path, measured: dict[str, Any] | None = None) -> Path:
    """(Re)write an existing artifact's ``README.md`` and ``custom_generate/`` (e.g. after measuring it)."""
    from kangaroo_lit.hf.artifact_generate import write_custom_generate

    artifact_dir = Path(artifact_dir)
    (artifact_dir / "README.md").write_text(model_card(read_manifest(artifact_dir), measured))
    write_custom_generate(artifact_dir)
    return artifact_dir / "README.md"


def record_in_manifest(artifact_dir: str | Path, key: str, record: Any) -> None:
    """Set ``key`` of an artifact's ``kangaroo.json`` to ``record`` (``calibrate``'s temperature, the cost
    model's sizing), atomically: a crash mid-write leaves the old file, never a partial one."""
    path = Path(artifact_dir) / MANIFEST
    data = json.loads(path.read_text())
    data[key] = record
    tmp = path.with_name(MANIFEST + ".partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _field_error(artifact_dir: Path, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"artifact {artifact_dir}: {MANIFEST} field '{field}' {problem}")


def _check_field(manifest: dict, artifact_dir: Path, field: str, kinds: tuple[type, ...], what: str,
                 prefix: str = "") -> Any:
    if field not in manifest:
        raise _field_error(artifact_dir, prefix + field, "is missing")
    value = manifest[field]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _field_error(artifact_dir, prefix + field, f"must be {what}, got {value!r}")
    return value


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    """Parse and check ``kangaroo.json``: every field the loader needs is there, with a usable value.

    Raises:
        CheckpointError: the directory does not exist or is no artifact, the file is not JSON, of another
            format version, or a field is missing or malformed (named with its value).
    """
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not artifact_dir.is_dir():
        raise CheckpointError(f"no such artifact directory: {artifact_dir}")
    if not path.is_file():
        raise CheckpointError(f"{artifact_dir} is not a kangaroo_lit artifact: {MANIFEST} is missing "
                              "(`kangaroo-lit export` writes it)")
    manifest = _read_json_object(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {manifest.get('format_version')!r}, this kangaroo_lit reads "
                              f"{FORMAT_VERSION}")
    _check_field(manifest, artifact_dir, "base_model", (str,), "a model name or path")
    _check_field(manifest, artifact_dir, "model_type", (str,), "a string")
    num_layers = _check_field(manifest, artifact_dir, "num_layers", (int,), "an int")
    exit_layer = _check_field(manifest, artifact_dir, "exit_layer", (int,), "an int")
    if not 0 <= exit_layer <= num_layers - 2:
        raise _field_error(artifact_dir, "exit_layer", f"is {exit_layer}, outside 0..{num_layers - 2} for the "
                           f"{num_layers} layers of field 'num_layers'")
    dtype = _check_field(manifest, artifact_dir, "dtype", (str,), "a dtype name")
    try:
        resolve_dtype(dtype)
    except KangarooError as err:
        raise _field_error(artifact_dir, "dtype", str(err)) from None
    exit_head = _check_field(manifest, artifact_dir, "exit_head", (str,), "'shared' or 'trainable'")
    if exit_head not in ("shared", "trainable"):
        raise _field_error(artifact_dir, "exit_head", f"must be 'shared' or 'trainable', got {exit_head!r}")
    if manifest.get("draft_vocab_size") is not None:  # absent or null: a full-vocabulary head
        k = _check_field(manifest, artifact_dir, "draft_vocab_size", (int,), "an int >= 1 or null")
        if k < 1:
            raise _field_error(artifact_dir, "draft_vocab_size", f"must be >= 1 or null, got {k}")
    adapter = _check_field(manifest, artifact_dir, "adapter", (dict,), "an object")
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads"):
        _check_field(adapter, artifact_dir, key, (int,), "an int", prefix="adapter.")
    if adapter.get("mlp_width") is not None:  # absent in artifacts made before the adapter MLP: none
        width = _check_field(adapter, artifact_dir, "mlp_width", (int,), "an int >= 0", prefix="adapter.")
        if width < 0:
            raise _field_error(artifact_dir, "adapter.mlp_width", f"must be >= 0, got {width}")
    lora = _check_field(manifest, artifact_dir, "lora", (dict, type(None)), "an object or null")
    if lora is not None:
        rank = _check_field(lora, artifact_dir, "rank", (int,), "an int >= 1", prefix="lora.")
        if rank < 1:
            raise _field_error(artifact_dir, "lora.rank", f"must be >= 1 (no LoRA is lora: null), got {rank}")
        _check_field(lora, artifact_dir, "alpha", (int, float), "a number", prefix="lora.")
        targets = _check_field(lora, artifact_dir, "target_modules", (list,), "a list of module names",
                               prefix="lora.")
        if not targets or not all(isinstance(t, str) for t in targets):
            raise _field_error(artifact_dir, "lora.target_modules", f"must be a list of module names, got {targets!r}")
        scope = _check_field(lora, artifact_dir, "scope", (str,), "'draft' or 'shared'", prefix="lora.")
        if scope not in ("draft", "shared"):
            raise _field_error(artifact_dir, "lora.scope", f"must be 'draft' or 'shared', got {scope!r}")
        if "dropout" in lora:
            _check_field(lora, artifact_dir, "dropout", (int, float), "a number", prefix="lora.")
        if "layers" in lora and lora["layers"] != list(range(exit_layer + 1)):
            raise CheckpointError(f"artifact {artifact_dir}: {MANIFEST} field 'exit_layer' is {exit_layer} (LoRA on "
                                  f"layers {list(range(exit_layer + 1))}) but field 'lora.layers' is {lora['layers']}")
    _check_training_record(manifest, artifact_dir)
    return manifest


def _confidence_temperature(artifact_dir: Path, manifest: dict) -> float:
    """``calibration.temperature`` (``kangaroo-lit calibrate``), 1.0 for an uncalibrated draft."""
    calibration = manifest.get("calibration")
    if calibration is None:
        return 1.0
    value = calibration.get("temperature") if isinstance(calibration, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _field_error(artifact_dir, "calibration.temperature", f"must be a number > 0, got {value!r}")
    return float(value)


def _check_training_record(manifest: dict, artifact_dir: Path) -> None:
    """The fields the draft's tensors depend on agree with the training settings recorded beside them."""
    model = (manifest.get("training") or {}).get("model")
    if not isinstance(model, dict):
        return  # a hand-made manifest: nothing to compare with
    checks = []
    if "exit_layer" in model:
        checks.append(("exit_layer", manifest["exit_layer"], "training.model.exit_layer", model["exit_layer"]))
    if isinstance(model.get("lora"), dict) and "rank" in model["lora"]:
        rank = manifest["lora"]["rank"] if manifest["lora"] else 0
        checks.append(("lora.rank", rank, "training.model.lora.rank", model["lora"]["rank"]))
    if isinstance(model.get("draft"), dict) and "exit_head" in model["draft"]:
        trained_head = model["draft"]["exit_head"]
        checks.append(("exit_head", manifest["exit_head"], "training.model.draft.exit_head", trained_head))
    if isinstance(model.get("draft"), dict) and "vocab_size" in model["draft"]:
        checks.append(("draft_vocab_size", manifest.get("draft_vocab_size"), "training.model.draft.vocab_size",
                       model["draft"]["vocab_size"]))
    if isinstance(model.get("draft"), dict) and "adapter_mlp" in model["draft"]:
        checks.append(("adapter.mlp_width", manifest["adapter"].get("mlp_width") or 0,
                       "training.model.draft.adapter_mlp", model["draft"]["adapter_mlp"]))
    for field, value, trained_field, trained in checks:
        if value != trained:
            shown = "0 (lora: null)" if field == "lora.rank" and not manifest["lora"] else repr(value)
            raise CheckpointError(f"artifact {artifact_dir}: {MANIFEST} field '{field}' is {shown} but "
                                  f"'{trained_field}' (the run that trained these weights) is {trained!r}")


def _lora_config_mismatch(artifact_dir: Path, manifest: dict) -> None:
    """``lora/adapter_config.json`` (what PEFT saved with the tensors) says what ``kangaroo.json`` says."""
    lora = manifest["lora"]
    lora_dir = artifact_dir / LORA_DIR
    if lora is None:
        if lora_dir.exists():
            raise CheckpointError(f"artifact {artifact_dir}: {MANIFEST} field 'lora' is null but the artifact has "
                                  f"LoRA weights in {LORA_DIR}/")
        return
    config_path = lora_dir / "adapter_config.json"
    for needed in (config_path, lora_dir / "adapter_model.safetensors"):
        if not needed.is_file():
            raise CheckpointError(f"artifact {artifact_dir}: {MANIFEST} field 'lora' sets rank {lora['rank']} but "
                                  f"{needed.relative_to(artifact_dir)} is missing")
    config = _read_json_object(config_path)

    def as_sorted(value: Any) -> Any:
        return sorted(value) if isinstance(value, (list, tuple, set)) else value

    alpha = config.get("lora_alpha")
    layers = config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    checks = [
        ("lora.rank", lora["rank"], "r", config.get("r")),
        ("lora.alpha", float(lora["alpha"]), "lora_alpha", float(alpha) if isinstance(alpha, (int, float)) else alpha),
        ("lora.target_modules", as_sorted(lora["target_modules"]), "target_modules",
         as_sorted(config.get("target_modules"))),
        ("exit_layer", list(range(manifest["exit_layer"] + 1)), "layers_to_transform",
         sorted(layers) if isinstance(layers, list) else layers),
    ]
    for field, value, key, saved in checks:
        if value != saved:
            shown = f"{manifest['exit_layer']} (LoRA on layers {value})" if field == "exit_layer" else repr(value)
            raise CheckpointError(f"artifact {artifact_dir}: {MANIFEST} field '{field}' is {shown} but "
                                  f"{LORA_DIR}/adapter_config.json has {key} {saved!r}")


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Names and shapes of the tensors in a safetensors file, without loading them."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # SafetensorError, OSError: a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(err).strip()[:160]})") from err


def _check_tensors(artifact_dir: Path, relative: str, expected: dict[str, torch.Size], strip: str = "") -> None:
    """The file holds exactly the tensors, with the shapes, of the model built from the manifest."""
    path = artifact_dir / relative
    if not path.is_file():
        raise CheckpointError(f"artifact {artifact_dir}: {relative} is missing")
    got = _tensor_shapes(path)
    want = {k[len(strip):] if strip and k.startswith(strip) else k: list(v) for k, v in expected.items()}
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    built = f"the model built from {MANIFEST}"
    if missing:
        raise CheckpointError(f"artifact {artifact_dir}: {relative} lacks {len(missing)} tensor(s) that {built} "
                              f"needs, e.g. {missing[0]!r} of shape {want[missing[0]]}")
    if unexpected:
        raise CheckpointError(f"artifact {artifact_dir}: {relative} holds {len(unexpected)} tensor(s) that fit no "
                              f"parameter of {built}, e.g. {unexpected[0]!r} of shape {got[unexpected[0]]}")
    for name, shape in want.items():
        if got[name] != shape:
            raise CheckpointError(f"artifact {artifact_dir}: tensor {name!r} in {relative} has shape {got[name]} but "
                                  f"{built} expects {shape}")


def _check_base(artifact_dir: Path, manifest: dict, config: Any, base_name: str) -> None:
    """The base model is the one the draft was trained on, as far as its configuration can tell."""
    adapter = manifest["adapter"]
    checks = [
        ("model_type", manifest["model_type"], "model_type", config.model_type),
        ("num_layers", manifest["num_layers"], "num_hidden_layers", config.num_hidden_layers),
        ("adapter.hidden_size", adapter["hidden_size"], "hidden_size", config.hidden_size),
        ("adapter.num_attention_heads", adapter["num_attention_heads"], "num_attention_heads",
         config.num_attention_heads),
        ("adapter.num_key_value_heads", adapter["num_key_value_heads"], "num_key_value_heads",
         getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
    ]
    for field, value, key, actual in checks:
        if value != actual:
            raise CheckpointError(f"artifact {artifact_dir}: {MANIFEST} field '{field}' is {value!r} but the base "
                                  f"model {base_name} has {key} {actual!r} (a draft works only on the base it was "
                                  "trained on: pass that one with --base_model)")


def _base_model_source(artifact_dir: Path, manifest: dict, base_model: str | None) -> str:
    """The base model to load: the override, else the recorded one, which must still exist if it is a path."""
    if base_model is not None:
        try:
            return resolve_path(base_model)
        except FileNotFoundError as err:  # an unknown embedded: asset
            raise ModelSourceError(str(err)) from None
    recorded = manifest["base_model"]
    try:
        name = resolve_path(recorded)
    except FileNotFoundError as err:  # an embedded: asset this installation lacks
        raise ModelSourceError(f"artifact {artifact_dir}: {err}; pass --base_model <path or hub name>") from None
    if looks_like_local_path(name) and not Path(name).expanduser().exists():
        raise ModelSourceError(f"artifact {artifact_dir}: its base model {recorded} (recorded in {MANIFEST}) no "
                               "longer exists; pass --base_model <path or hub name> to say where that model is now")
    return name


def load_artifact(artifact_dir: str | Path, dtype: str | torch.dtype | None = None, device: str | None = None,
                  base_model: str | PreTrainedModel | None = None) -> KangarooModel:
    """Rebuild the :class:`KangarooModel` of an artifact, in eval mode.

    The manifest is checked against the files before anything is loaded into the model: the LoRA
    configuration PEFT saved, the base model's configuration, and the name and shape of every tensor
    (none missing, none left over). A mismatch is a one-line :class:`CheckpointError`.

    Args:
        dtype: dtype of the whole model (base and trainable parts); default the manifest's.
        device: where to put it (default CPU).
        base_model: override the base model's name or path (e.g. a local copy of the Hub model), or an
            HF causal LM already loaded, which the draft is then built on (its weights are shared, not
            copied; with LoRA, PEFT inserts the LoRA layers into its shallow layers): ``dtype`` and
            ``device`` are then its own, and another ``dtype`` is refused.
    """
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    _lora_config_mismatch(artifact_dir, manifest)
    trainable = manifest["exit_head"] == "trainable"
    if not trainable and (artifact_dir / HEAD_FILE).exists():
        raise CheckpointError(f"artifact {artifact_dir}: {MANIFEST} field 'exit_head' is 'shared' but the artifact "
                              f"has a trained head in {HEAD_FILE}")
    draft_vocab = _read_draft_vocab(artifact_dir, manifest.get("draft_vocab_size"))
    if isinstance(base_model, PreTrainedModel):
        base, base_name = base_model, str(getattr(base_model, "name_or_path", "") or "the given model")
        torch_dtype = base.dtype
        if dtype is not None and resolve_dtype(dtype) != torch_dtype:
            raise ConfigError(f"dtype {dtype}: the given base model {base_name} is {torch_dtype}; a draft built on "
                              "a loaded model takes its dtype")
        device = base.device
    else:
        torch_dtype = resolve_dtype(dtype or manifest["dtype"])
        base_name = _base_model_source(artifact_dir, manifest, base_model)
        base = load_base_model(base_name, torch_dtype)
    _check_base(artifact_dir, manifest, base.config, base_name)
    lora = None
    if manifest["lora"]:
        m = manifest["lora"]
        lora = LoraSettings(rank=m["rank"], alpha=m["alpha"], dropout=m.get("dropout", 0.0),
                            target_modules=list(m["target_modules"]), scope=m["scope"])
    if draft_vocab is not None and int(draft_vocab.max()) >= base.get_output_embeddings().out_features:
        raise CheckpointError(f"artifact {artifact_dir}: {DRAFT_VOCAB_FILE} holds token id {int(draft_vocab.max())}, "
                              f"outside the vocabulary of the base model {base_name} "
                              f"({base.get_output_embeddings().out_features} tokens)")
    temperature = _confidence_temperature(artifact_dir, manifest)
    # Artifacts from before the adapter MLP existed have no mlp_width: Kangaroo's adapter.
    adapter_mlp = manifest["adapter"].get("mlp_width") or 0
    model = KangarooModel(base, manifest["exit_layer"], lora=lora, exit_head=manifest["exit_head"],
                          trainable_dtype=torch_dtype, draft_vocab=draft_vocab, adapter_mlp=adapter_mlp)
    model.confidence_temperature = temperature
    _check_tensors(artifact_dir, ADAPTER_FILE, {k: v.shape for k, v in model.adapter.state_dict().items()})
    if model.exit_proj is not None:
        _check_tensors(artifact_dir, HEAD_FILE, {k: v.shape for k, v in model.exit_proj.state_dict().items()})
    if model.has_lora:
        from peft import get_peft_model_state_dict

        _check_tensors(artifact_dir, f"{LORA_DIR}/adapter_model.safetensors",
                       {k: v.shape for k, v in get_peft_model_state_dict(model.base).items()})
    model.adapter.load_state_dict(load_file(str(artifact_dir / ADAPTER_FILE)))
    if model.exit_proj is not None:
        model.exit_proj.load_state_dict(load_file(str(artifact_dir / HEAD_FILE)))
    if model.has_lora:
        from peft import set_peft_model_state_dict

        lora_state = load_file(str(artifact_dir / LORA_DIR / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model.base, lora_state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise CheckpointError(f"{artifact_dir / LORA_DIR}: LoRA tensors that fit no module: {unexpected[:5]}")
    model.to(device or "cpu")
    model.requires_grad_(False)
    return model.eval()


def _read_draft_vocab(artifact_dir: Path, k: int | None) -> torch.Tensor | None:
    """The K token ids of a restricted draft head (checked), or None for a full-vocabulary head."""
    path = artifact_dir / DRAFT_VOCAB_FILE
    if k is None:
        if path.exists():
            raise CheckpointError(f"artifact {artifact_dir}: {MANIFEST} field 'draft_vocab_size' is null (a "
                                  f"full-vocabulary head) but the artifact has draft token ids in {DRAFT_VOCAB_FILE}")
        return None
    _check_tensors(artifact_dir, DRAFT_VOCAB_FILE, {"draft_vocab": torch.Size([k])})
    ids = load_file(str(path))["draft_vocab"]
    if ids.dtype != torch.int64:
        raise CheckpointError(f"artifact {artifact_dir}: {DRAFT_VOCAB_FILE} holds {ids.dtype} ids, expected int64")
    try:
        return check_draft_vocab(ids, vocab_size=2**62)  # the base's vocabulary is checked once it is loaded
    except ValueError as err:
        raise CheckpointError(f"artifact {artifact_dir}: {DRAFT_VOCAB_FILE}: {err}") from None


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, base_model: str | None = None,
                      overwrite: bool = False) -> Path:
    """Lightning checkpoint -> artifact directory (the base model is rebuilt from its name/path).

    ``ckpt_path`` is a checkpoint file or a DeepSpeed checkpoint directory
    (:func:`~kangaroo_lit.checkpointing.load_checkpoint`). ``out_dir`` is checked first (before the model
    is loaded); see :func:`save_artifact` for ``overwrite``.
    """
    import dataclasses

    from kangaroo_lit.checkpointing import load_checkpoint, saved_settings
    from kangaroo_lit.lit_module import KangarooLitModule

    check_out_dir(out_dir, overwrite, keep=(str(ckpt_path),))
    ckpt = load_checkpoint(ckpt_path)
    settings = saved_settings(ckpt, source=str(ckpt_path))
    if base_model is not None:
        settings = dataclasses.replace(settings, base_model=base_model)
    module = KangarooLitModule.from_settings(settings)
    module.configure_model()
    module.on_load_checkpoint(ckpt)  # refuses a checkpoint of another configuration
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if unexpected:
        raise CheckpointError(f"{ckpt_path}: tensors that fit no parameter: {unexpected[:5]}")
    training = {
        "model": settings.to_dict(),
        "data": ckpt.get("datamodule_hyper_parameters"),
        "global_step": ckpt.get("global_step"),
        "epoch": ckpt.get("epoch"),
        "checkpoint": str(Path(ckpt_path).resolve()),
    }
    return save_artifact(module.model, out_dir, settings.base_model, settings.dtype, training=training,
                         metrics=ckpt.get("kangaroo_metrics"), overwrite=overwrite)


def _read_json_object(path: Path) -> dict:
    """A JSON file holding one object, or a CheckpointError naming the file (and line)."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
