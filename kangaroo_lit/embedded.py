"""The embedded default: a tiny Llama trained by the project and its bundled instruction data.

Configs name them as ``embedded:tiny-llama`` and ``embedded:tiny-instruct.jsonl`` so they resolve
inside the installed package wherever the command runs.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
PREFIX = "embedded:"
TINY_MODEL = PREFIX + "tiny-llama"
TINY_DATA = PREFIX + "tiny-instruct.jsonl"


def resolve_path(name_or_path: str | None) -> str | None:
    """Turn a short name into a path: ``embedded:<name>`` (a bundled asset) or ``model:<name>`` (a model
    pulled by ``kangaroo-lit pull``, :mod:`kangaroo_lit.model_zoo`); anything else is returned unchanged.

    Raises:
        FileNotFoundError: if an ``embedded:`` asset does not exist (listing the available ones).
        ModelSourceError: if a ``model:`` name is unknown or not pulled yet (saying how to pull it).
    """
    if name_or_path is not None and str(name_or_path).startswith("model:"):
        from kangaroo_lit.model_zoo import model_path

        return str(model_path(str(name_or_path)))
    if name_or_path is None or not str(name_or_path).startswith(PREFIX):
        return name_or_path
    path = ASSETS_DIR / str(name_or_path)[len(PREFIX):]
    if not path.exists():
        available = sorted(PREFIX + p.name for p in ASSETS_DIR.iterdir()) if ASSETS_DIR.is_dir() else []
        raise FileNotFoundError(f"no embedded asset {name_or_path!r}; available: {', '.join(available)}")
    return str(path)
