"""The transformers internals kangaroo_lit's ``generate`` integration relies on, all here.

Checked against transformers 5.17 and 5.23 (``tests/test_hf_generate.py::test_transformers_internals``
fails loudly when a release changes them):

* ``GenerationMixin.generate`` calls a *callable* ``custom_generate`` as it calls ``_sample``:
  ``(model, input_ids, logits_processor=..., stopping_criteria=..., generation_config=..., **model_kwargs)``,
  after it has put the prompt into the streamer, but it passes the callable neither the ``streamer`` nor
  ``assistant_model`` (it keeps only the keyword arguments that ``_sample`` does not take). They are
  read from ``generate``'s own frame, the only place they are.
* A *directory* ``custom_generate`` is called as ``generate(model=..., **generate's arguments)``
  without the ``custom_generate`` value itself, from a copy of ``generate.py`` in the HF modules cache
  (so its ``__file__`` is not the artifact): the directory is read from ``generate``'s frame too.
* The warpers ``do_sample`` adds keep their settings in the attributes ``temperature``, ``top_k``,
  ``top_p`` and ``min_tokens_to_keep``.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers.generation.utils import GenerationMixin

from kangaroo_lit.errors import KangarooError

_GENERATE_CODE = inspect.unwrap(GenerationMixin.generate).__code__
# What a custom_generate callable needs from generate's frame (and never gets as an argument).
CALLER_ARGUMENTS = ("streamer", "assistant_model", "custom_generate", "prefix_allowed_tokens_fn")


def generate_call_arguments() -> dict[str, Any]:
    """``streamer``, ``assistant_model``, ``custom_generate``, ``prefix_allowed_tokens_fn`` of the innermost
    running ``GenerationMixin.generate`` call.

    Raises:
        KangarooError: no ``generate`` call on the stack (called directly, or a transformers release that
            calls ``custom_generate`` differently: kangaroo_lit is tested with 5.17-5.23).
    """
    frame = inspect.currentframe()
    try:
        caller = frame.f_back if frame is not None else None
        while caller is not None:
            if caller.f_code is _GENERATE_CODE:
                return {name: caller.f_locals.get(name) for name in CALLER_ARGUMENTS}
            caller = caller.f_back
    finally:
        del frame
    import transformers

    raise KangarooError(
        "kangaroo custom_generate must be called by transformers' GenerationMixin.generate "
        f"(model.generate(..., custom_generate=...)); none is running (transformers {transformers.__version__}: "
        "kangaroo_lit is tested with 5.17-5.23)")


def warper_settings(processor: Any) -> dict[str, Any]:
    """The settings a sampling warper applies: ``temperature``, ``top_k`` or ``top_p`` (and
    ``min_tokens_to_keep``), read from the attributes transformers stores them in."""
    return {name: getattr(processor, name) for name in ("temperature", "top_k", "top_p", "min_tokens_to_keep")
            if hasattr(processor, name)}
