"""A CPU kernel for linear layers on a few input rows: verification at the price of one decode step.

Why: on a CPU, decoding is memory-bound: every step streams all weights once. One input row goes through
MKL's matrix-vector path at full memory bandwidth, but 2-8 rows (a verification window) go through its
matrix-matrix path, which reaches about half of that bandwidth on these AVX2 cores even with weights
pre-packed for the row count (BENCHMARKS.md, "Why verifying k tokens costs more than one step"). So
verifying 4 tokens cost 1.5x one step instead of about 1x, the main cost a CPU adds to speculation.

The kernel (``streaming_linear.cpp`` beside this module) reads each weight row once and multiplies it with
all (at most :data:`MAX_ROWS`) input rows held in registers and L1, so k rows cost about what one row
costs. Every output element is reduced in the same order whatever the number of rows, so a token's logits
do not depend on how many tokens share its pass (the property that keeps speculative output equal to
step-by-step output).

The row limit is checked, not assumed: :func:`few_rows_linear` refuses more than :data:`MAX_ROWS` rows
(``ValueError``), and a linear patched by :func:`streaming_linears` sends larger inputs (a prompt's
prefill, say) to ``F.linear``, so a caller never has to keep its windows under the limit for correctness,
only for speed.

It is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (needs a C++ compiler and
ninja; a minute, then cached; a one-line note on stderr says so before a compile). Where it cannot be
built (no compiler, no AVX2 + FMA) :func:`available` says why and models keep torch's eager linear, which
stays the reference the tests compare against. Messages here name no command-line option: the commands
that offer the kernel word their own.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kangaroo_lit.errors import ConfigError
from kangaroo_lit.settings import KERNEL_MAX_ROWS

Kernel = Literal["eager", "streaming"]  # the kernels a command can choose between
# The most input rows one kernel call takes: a verification window (the drafts plus the round's first
# token). One number for the whole project: DecodingSettings refuses windows above it with the same constant.
MAX_ROWS = KERNEL_MAX_ROWS

_EXTENSION_NAME = "kangaroo_streaming_linear"
_CPP_FILE = "streaming_linear.cpp"


class KernelUnavailable(ConfigError):
    """The streaming kernel cannot be built or run on this machine; :attr:`reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the streaming kernel is not available here: {reason}; the eager kernel works everywhere")
        self.reason = reason


@functools.lru_cache(maxsize=1)
def _cpp_source() -> str:
    """The kernel's C++ source, read from the package (so it ships with an installed, non-editable copy)."""
    return resources.files(__package__).joinpath(_CPP_FILE).read_text(encoding="utf-8")


def _needs_compiling(name: str = _EXTENSION_NAME) -> bool:
    """Whether ``load_inline`` is about to compile, rather than load torch's cached build of this source.

    The cached build is ``<build dir>/<name>.so`` beside the ``main.cpp`` it was built from; a missing
    library, or a ``main.cpp`` without this version's source, means a compile. (Changed compiler flags
    also rebuild, unseen here: then the note is missing, never false.)
    """
    try:
        from torch.utils.cpp_extension import _get_build_directory

        build = Path(_get_build_directory(name, verbose=False))
        source = build / "main.cpp"
        return not ((build / f"{name}.so").is_file() and source.is_file() and _cpp_source() in source.read_text())
    except Exception:  # a private torch helper: if it moved, assume the slow case and say so
        return True


@functools.lru_cache(maxsize=1)
def _build() -> tuple[object | None, str]:
    """Compile the extension once per process; returns (module or None, why not)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return None, f"the CPU has no AVX2 (torch reports {capability})"
    try:
        from torch.utils.cpp_extension import load_inline

        if _needs_compiling():
            # the first run with the kernel is otherwise silent for about a minute
            print("note: compiling the streaming kernel (once, about a minute) ...", file=sys.stderr, flush=True)
        module = load_inline(
            name=_EXTENSION_NAME,
            cpp_sources=[_cpp_source()],
            functions=["few_rows_linear"],
            # -fopenmp: ATen's parallel_for is an OpenMP pragma in the header; without it the kernel runs on
            # one thread whatever torch.get_num_threads() says
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # no compiler / ninja / headers: eager stays, with the reason
        return None, f"building the kernel failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return module, ""


def available() -> tuple[bool, str]:
    """Whether the kernel can be used here (building it on first call), and if not, why."""
    module, why = _build()
    return module is not None, why


def rows_of(x: torch.Tensor) -> int:
    """How many input rows ``x`` holds for a linear: the product of its leading dimensions."""
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for float32 inputs of 1 to :data:`MAX_ROWS` rows, through the streaming kernel.

    Args:
        x: (..., K) with 1 to :data:`MAX_ROWS` rows in all (product of the leading dimensions).
        weight: (N, K) float32.
        bias: (N,) or None.

    Returns:
        (..., N), equal to ``F.linear(x, weight, bias)`` up to float32 rounding.

    Raises:
        ValueError: ``x`` has no rows or more than :data:`MAX_ROWS` (checked before the kernel is built).
        KernelUnavailable: the kernel cannot be built here.
    """
    rows = rows_of(x)
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"the streaming kernel takes 1 to {MAX_ROWS} input rows, got {rows} (use F.linear)")
    module, why = _build()
    if module is None:
        raise KernelUnavailable(why)
    flat = x.reshape(-1, x.shape[-1])
    return module.few_rows_linear(flat, weight, bias).reshape(*x.shape[:-1], weight.shape[0])


def uses_kernel(linear: nn.Linear, x: torch.Tensor) -> bool:
    """Whether a patched ``linear`` sends ``x`` to the kernel: float32 on the CPU, no gradients needed, and
    1 to :data:`MAX_ROWS` rows. Anything else (a prompt's prefill, another dtype or device, training) keeps
    ``F.linear``: the limit is the kernel's, never the caller's to respect."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad)
    return (1 <= rows_of(x) <= MAX_ROWS and x.dtype == torch.float32 and linear.weight.dtype == torch.float32
            and x.device.type == "cpu" and not needs_grad)


def _streaming_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if uses_kernel(self, x):
        return few_rows_linear(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


@contextmanager
def streaming_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Route every ``nn.Linear`` of ``model`` through the streaming kernel where :func:`uses_kernel` says so.

    Larger inputs than :data:`MAX_ROWS` rows, other dtypes, other devices and anything that needs gradients
    keep ``F.linear``. Yields the number of linears patched (0 when disabled); restores the original
    forwards on exit.

    Raises:
        KernelUnavailable: enabled but the kernel cannot be built here (a :class:`ConfigError`; its
            ``reason`` says why, for a caller that words the message for its own options).
    """
    if not enabled:
        yield 0
        return
    ok, why = available()
    if not ok:
        raise KernelUnavailable(why)
    # Plain nn.Linear only (peft's LoRA layers call theirs through ``base_layer``), and none whose forward
    # someone else already replaced on the instance (an offloading hook, say): theirs stays.
    patched = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m)]
    for m in patched:
        m.forward = types.MethodType(_streaming_forward, m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward
