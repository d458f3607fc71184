"""Benchmarks: ``kangaroo-lit bench <name>`` (or ``python -m kangaroo_lit.bench <name>``).

* ``decode`` (:mod:`~kangaroo_lit.bench.decode`): self-speculative decoding vs the vanilla loop vs HF
  ``generate``, on the same prompts in the same process;
* ``cost_model`` (:mod:`~kangaroo_lit.bench.cost_model`): c, v_k and the forced-acceptance speedup
  against its prediction;
* ``train_step`` (:mod:`~kangaroo_lit.bench.train_step`): SGP vs joint vs plain LoRA, through Lightning
  and a raw PyTorch loop.

Shared helpers (timing, machine info, tables, output files) are in :mod:`~kangaroo_lit.bench.common`;
every benchmark writes JSON (every number), Markdown (the tables for BENCHMARKS.md) and a PNG plot.
"""
