"""Compute kernels that replace torch's own where it is slow for decoding (compiled on first use).

:mod:`kangaroo_lit.kernels.streaming_linear`: linear layers over a few rows (a verification window) on the
CPU, for about the price of one row.
"""

from kangaroo_lit.kernels.streaming_linear import (
    MAX_ROWS,
    Kernel,
    KernelUnavailable,
    available,
    few_rows_linear,
    streaming_linears,
)

__all__ = ["MAX_ROWS", "Kernel", "KernelUnavailable", "available", "few_rows_linear", "streaming_linears"]
