"""An artifact as a ``custom_generate`` directory: ``model.generate(**inputs, custom_generate="path/to/artifact",
trust_remote_code=True)``.

``generate`` runs the artifact's ``custom_generate/generate.py`` (written by :func:`write_custom_generate`)
with its own arguments and ``model=``; that file calls :func:`generate_with_artifact`, which builds the
draft on ``model`` itself (its weights shared, not copied: ``model`` is the base that verifies) and calls
``generate`` again with the :func:`~kangaroo_lit.hf.kangaroo_generate` callable, so every option means
what it means in plain ``generate``. The draft is built once per model and artifact and kept on the
model; with LoRA, PEFT's LoRA layers enter the model's shallow layers but are active only while the
draft decodes, so the model's plain outputs stay its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers.generation.utils import GenerationMixin

from kangaroo_lit.draft import Draft, load_draft
from kangaroo_lit.errors import ConfigError
from kangaroo_lit.hf.custom_generate import kangaroo_generate
from kangaroo_lit.hf.internals import generate_call_arguments

CUSTOM_GENERATE_DIR = "custom_generate"
_DRAFTS_ATTRIBUTE = "_kangaroo_drafts"  # on the HF model: {artifact directory: Draft}

GENERATE_PY = '''"""custom_generate for this kangaroo_lit draft (a self-speculative draft of its base model).

    model.generate(**inputs, custom_generate="<this folder, or its Hub repo>", trust_remote_code=True,
                   max_new_tokens=128)

`model` must be the draft's base model (README.md names it); the draft is built on it from this folder
(kangaroo.json, the adapter, LoRA), so greedy output is identical to plain `model.generate` and sampling
follows the same distribution. Needs the kangaroo_lit package installed.
"""

from kangaroo_lit.hf import generate_with_artifact


def generate(model, **kwargs):
    return generate_with_artifact(model, **kwargs)
'''
REQUIREMENTS_TXT = "kangaroo_lit\n"


def write_custom_generate(artifact_dir: str | Path) -> Path:
    """Write ``custom_generate/generate.py`` (and ``requirements.txt``) into an artifact directory."""
    folder = Path(artifact_dir) / CUSTOM_GENERATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generate.py").write_text(GENERATE_PY)
    (folder / "requirements.txt").write_text(REQUIREMENTS_TXT)
    return folder


def _artifact_directory(source: Any) -> Path:
    """The local directory of ``custom_generate``'s value: a path as is, a Hub repo from the local HF cache
    (or downloaded, unless offline)."""
    if source is None or not isinstance(source, (str, Path)):
        raise ConfigError("kangaroo custom_generate: cannot tell which artifact generate loaded; call "
                          "generate_with_artifact(model, artifact=...) directly")
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source)))


def draft_on(model: PreTrainedModel, artifact_dir: Path) -> Draft:
    """The draft of ``artifact_dir`` built on ``model`` (once; kept on the model for later calls).

    Drafts of several artifacts may share one model: loading folds a draft-scoped LoRA into the draft's own
    copies of the shallow layers and leaves the model without LoRA modules
    (:meth:`~kangaroo_lit.model.KangarooModel.merge_lora_for_decoding`).

    Raises:
        ConfigError: the model carries the unmerged LoRA of a ``lora.scope: shared`` draft and this
            artifact has LoRA too (PEFT would stack a second).
    """
    drafts: dict[str, Draft] = model.__dict__.setdefault(_DRAFTS_ATTRIBUTE, {})  # not a submodule: plain dict
    key = str(artifact_dir)
    if key not in drafts:
        from kangaroo_lit.artifact import read_manifest

        unmerged = [name for name, d in drafts.items() if d.model.has_lora and not d.model.lora_merged]
        if read_manifest(artifact_dir)["lora"] and unmerged:
            raise ConfigError(f"{artifact_dir}: this model already carries the LoRA of another draft "
                              f"({', '.join(unmerged)}); load the base model again for a second draft with LoRA")
        drafts[key] = load_draft(artifact_dir, base_model=model)
    return drafts[key]


def generate_with_artifact(model: PreTrainedModel, artifact: str | Path | None = None, **generate_arguments: Any):
    """Decode with the artifact's draft through ``generate``: what ``custom_generate/generate.py`` runs.

    Args:
        model: the model ``generate`` was called on (the draft's base).
        artifact: the artifact directory; default the ``custom_generate`` value of the running
            ``generate`` call.
        **generate_arguments: ``generate``'s arguments, passed on unchanged.

    Returns:
        What ``generate`` returns (see :func:`~kangaroo_lit.hf.kangaroo_generate`).
    """
    if artifact is None:
        artifact = generate_call_arguments()["custom_generate"]
    draft = draft_on(model, _artifact_directory(artifact))
    generate_arguments.pop("custom_generate", None)
    # The class's generate: a model loaded with trust_remote_code may have its own generate swapped in.
    return GenerationMixin.generate(model, custom_generate=kangaroo_generate(draft), **generate_arguments)
