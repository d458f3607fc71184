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
    """Turn ``embedded:<name>`` into the asset's absolute path; anything else is returned unchanged.

    Raises:
        FileNotFoundError: if an ``embedded:`` asset does not exist (listing the available ones).
    """
    if name_or_path is None or not str(name_or_path).startswith(PREFIX):
        return name_or_path
    path = ASSETS_DIR / str(name_or_path)[len(PREFIX):]
    if not path.exists():
        available = sorted(PREFIX + p.name for p in ASSETS_DIR.iterdir()) if ASSETS_DIR.is_dir() else []
        raise FileNotFoundError(f"no embedded asset {name_or_path!r}; available: {', '.join(available)}")
    return str(path)
