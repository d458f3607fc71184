"""On-disk cache of tokenized data, keyed by everything that determines it.

The key hashes the tokenizer's *content* (its vocabulary, merges, normalisation and post-processing,
special token ids and chat template, not just its name: two checkpoints named alike may tokenize
differently), the prompt templates, the tokenization settings and the data's content (sha256 of the
file's bytes, or the Hub dataset's fingerprint). A changed input therefore never reuses a stale
entry; old entries are simply never read again.

Files are written atomically (temporary file in the same directory, then ``os.replace``), so
concurrent ranks or an interrupted run never leave a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from kangaroo_lit.data.dataset import TokenizedRows

log = logging.getLogger(__name__)

# Bump when the tokenization code changes what it produces for the same inputs.
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/kangaroo_lit/tokenized`` (``~/.cache/kangaroo_lit/tokenized`` by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "kangaroo_lit" / "tokenized"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what makes a tokenizer tokenize the way it does.

    Fast tokenizers serialise their whole pipeline with ``backend_tokenizer.to_str()``; slow ones
    fall back to their vocabulary. Special token ids and the chat template are added because they
    live outside that serialisation.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        core = backend.to_str()
    else:
        core = json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = {
        "class": type(tokenizer).__name__,
        "core": hashlib.sha256(core.encode("utf-8")).hexdigest(),
        "special": {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "len": len(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def cache_key(**parts) -> str:
    """A hex key over keyword parts (JSON-serialisable values), independent of their order."""
    payload = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir).expanduser() / f"{key}.pt"


def load_cached(path: Path) -> tuple[TokenizedRows, dict] | None:
    """Read a cache entry; ``None`` when it is absent or unreadable (then it is rebuilt).

    Returns:
        ``(rows, meta)`` where meta holds the truncation statistics and the key's parts.
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return TokenizedRows.from_state(state["rows"]), dict(state.get("meta", {}))
    except Exception as err:  # a corrupt or foreign file must not stop training: rebuild it
        log.warning("ignoring unreadable tokenization cache %s (%s); re-tokenizing", path, err)
        return None


def save_cached(path: Path, rows: TokenizedRows, meta: dict) -> None:
    """Write a cache entry atomically (a failure to write is logged, never fatal)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"rows": rows.to_state(), "meta": meta}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as err:
        log.warning("could not write tokenization cache %s (%s); continuing without it", path, err)
