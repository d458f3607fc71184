"""kangaroo_lit: train and evaluate lossless self-speculative decoding with PyTorch Lightning.

``from kangaroo_lit import load_draft`` loads a trained draft to decode with (:mod:`kangaroo_lit.draft`);
it is imported on first use, so importing the package stays cheap (no torch, no transformers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from kangaroo_lit.draft import Draft, load_draft

__all__ = ["Draft", "__version__", "load_draft"]

_LAZY = {"load_draft": "kangaroo_lit.draft", "Draft": "kangaroo_lit.draft"}


def __getattr__(name: str) -> Any:
    # PEP 562: the decoding API is imported when first asked for, not with the package.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kangaroo_lit' has no attribute {name!r}")
