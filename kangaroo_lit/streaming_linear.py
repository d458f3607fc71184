"""A CPU kernel for linear layers on a few input rows: verification at the price of one decode step.

Why: on a CPU, decoding is memory-bound: every step streams all weights once. One input row goes through
MKL's matrix-vector path at full memory bandwidth, but 2-8 rows (a verification window) go through its
matrix-matrix path, which reaches about half of that bandwidth on these AVX2 cores even with weights
pre-packed for the row count (BENCHMARKS.md, "Why verifying k tokens costs more than one step"). So
verifying 4 tokens cost 1.5x one step instead of about 1x, the main cost a CPU adds to speculation.

The kernel here reads each weight row once and multiplies it with all (<= 8) input rows held in
registers and L1, so k rows cost about what one row costs. Every output element is reduced in the same
order whatever the number of rows, so a token's logits do not depend on how many tokens share its pass
(the property that keeps speculative output equal to step-by-step output).

It is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (needs a C++ compiler and
ninja; a minute, then cached). Where it cannot be built (no compiler, no AVX2 + FMA) :func:`available`
says why and models keep torch's eager linear, which stays the reference the tests compare against.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kangaroo_lit.errors import ConfigError

Kernel = Literal["eager", "streaming"]  # the choice commands offer (``--kernel``)
MAX_ROWS = 8  # windows of up to 8 tokens (max_draft 7 + the bonus position); more rows use eager

_CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n]) for M <= 8 rows. Each weight row is loaded once and used
// for all M rows; each (m, n) is reduced in the same order for every M (batch-invariant).
template <int M>
static void rows_kernel(const float* x, const float* w, const float* b, float* y,
                        int64_t K, int64_t n0, int64_t n1, int64_t N) {
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256 wv = _mm256_loadu_ps(wr + k);
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), wv, acc[m]);
    }
    for (int m = 0; m < M; ++m) {
      // fixed-order horizontal sum: (lo + hi) then pairwise
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
      float total = _mm_cvtss_f32(s);
      for (int64_t k = K8; k < K; ++k) total += x[m * K + k] * wr[k];
      if (b) total += b[n];
      y[m * N + n] = total;
    }
  }
}

torch::Tensor few_rows_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shapes: x (M, K), w (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "1 to 8 rows");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: rows_kernel<1>(xp, wp, bp, yp, K, n0, n1, N); break;
      case 2: rows_kernel<2>(xp, wp, bp, yp, K, n0, n1, N); break;
      case 3: rows_kernel<3>(xp, wp, bp, yp, K, n0, n1, N); break;
      case 4: rows_kernel<4>(xp, wp, bp, yp, K, n0, n1, N); break;
      case 5: rows_kernel<5>(xp, wp, bp, yp, K, n0, n1, N); break;
      case 6: rows_kernel<6>(xp, wp, bp, yp, K, n0, n1, N); break;
      case 7: rows_kernel<7>(xp, wp, bp, yp, K, n0, n1, N); break;
      default: rows_kernel<8>(xp, wp, bp, yp, K, n0, n1, N); break;
    }
  });
  return y;
}
"""


_EXTENSION_NAME = "kangaroo_streaming_linear"


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
        return not ((build / f"{name}.so").is_file() and source.is_file() and _CPP_SOURCE in source.read_text())
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
            # the first --kernel streaming run is otherwise silent for about a minute
            print("note: compiling the streaming kernel (once, about a minute) ...", file=sys.stderr, flush=True)
        module = load_inline(
            name=_EXTENSION_NAME,
            cpp_sources=[_CPP_SOURCE],
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


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for float32 inputs of at most :data:`MAX_ROWS` rows, through the streaming kernel.

    Args:
        x: (..., K) with at most 8 rows in all (product of the leading dimensions).
        weight: (N, K) float32.
        bias: (N,) or None.

    Returns:
        (..., N), equal to ``F.linear(x, weight, bias)`` up to float32 rounding.
    """
    module, why = _build()
    if module is None:
        raise RuntimeError(f"streaming linear kernel unavailable: {why}")
    flat = x.reshape(-1, x.shape[-1])
    return module.few_rows_linear(flat, weight, bias).reshape(*x.shape[:-1], weight.shape[0])


def _streaming_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
    if (1 <= rows <= MAX_ROWS and x.dtype == torch.float32 and self.weight.dtype == torch.float32
            and x.device.type == "cpu" and not needs_grad):
        return few_rows_linear(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


@contextmanager
def streaming_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Route every ``nn.Linear`` of ``model`` through the streaming kernel for inputs of <= 8 rows.

    Larger inputs (prompt prefill), other dtypes, other devices and anything that needs gradients keep
    ``F.linear``. Yields the number of linears patched (0 when disabled or unavailable); restores the
    original forwards on exit.

    Raises:
        ConfigError: enabled but the kernel cannot be built here (the message says why).
    """
    if not enabled:
        yield 0
        return
    ok, why = available()
    if not ok:
        raise ConfigError(f"--kernel streaming: {why}; use --kernel eager")
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
