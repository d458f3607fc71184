"""How many torch CPU threads a command uses: one for tiny models, the free cores for real ones.

On a model of a few million parameters each operation is too small to split: extra OpenMP threads only
spin and wait (on the 2-core CI machines torch's default made ``generate`` 1.3-3.8 s a prompt against
0.05 s with one thread, and the tiny ``fit`` 0.19 against 2.0 it/s). From a few tens of millions of
parameters on, the matrix products are large enough to share, but only between cores that are free:
an OpenMP thread on a core that another process keeps busy stalls every parallel region of every layer
(on a 2-core machine with one core busy, SmolLM2 decoding at 2 threads ran anywhere from 0.5 to 24
tokens/s; at 1 thread 34-36). So the rule never asks for more threads than the cores this process may
run on minus the ones the 1-minute load average says are busy, and batch-1 decoding takes one thread,
which measured fastest even on an idle machine (BENCHMARKS.md, "CPU threads"). The load average lags
by about a minute: a job that just stopped still counts as busy for a while.
"""

from __future__ import annotations

import os

import torch

# Below this many parameters one thread is fastest on the machines measured (see the module docstring).
SMALL_MODEL_PARAMETERS = 20_000_000


def approx_parameters(config) -> int:
    """Parameters of a Llama-family decoder from its HF config (embeddings + attention + MLP), roughly."""
    d = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    attention = d * head_dim * (2 * heads + 2 * kv)
    mlp = 3 * d * config.intermediate_size
    embeddings = config.vocab_size * d * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return embeddings + config.num_hidden_layers * (attention + mlp)


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_cores() -> int:
    """Cores other processes keep busy: the 1-minute load average, rounded (0 where it is unknown)."""
    try:
        return int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):  # not available on this platform
        return 0


def free_cores() -> int:
    """Cores this process may run on that the load average leaves free (at least 1)."""
    return max(1, cpu_cores() - busy_cores())


def choose_threads(num_parameters: int | None, requested: int | None = None, decoding: bool = False) -> int:
    """``requested`` if given, else 1 for a small model or batch-1 decoding, and the free cores otherwise.

    Batch-1 decoding reads every weight once per token: one core streams them nearly as fast as the
    memory allows, and a second thread measured slower even on an idle machine (SmolLM2-135M: 16.8 against
    15.6 tokens/s; 5.8 with the other core busy: BENCHMARKS.md, "CPU threads").
    """
    if requested is not None:
        if requested < 1:
            from kangaroo_lit.errors import ConfigError

            raise ConfigError(f"threads must be >= 1, got {requested}")
        return requested
    if decoding or (num_parameters is not None and num_parameters < SMALL_MODEL_PARAMETERS):
        return 1
    return free_cores()


def apply_threads(num_parameters: int | None, requested: int | None, quiet: bool = False,
                  decoding: bool = False) -> int:
    """Set torch's CPU threads by :func:`choose_threads` and say on stderr how many and why."""
    import sys

    threads = choose_threads(num_parameters, requested, decoding)
    torch.set_num_threads(threads)
    if not quiet:
        if requested is not None:
            why = "as asked"
        elif decoding:
            why = "for batch-1 decoding (fastest measured; --threads N to change)"
        else:
            size = f"a {num_parameters / 1e6:.1f}M-parameter model" if num_parameters is not None else "this model"
            cores, busy = cpu_cores(), busy_cores()
            why = f"for {size} ({cores} cores, {min(busy, cores)} busy by the load average); --threads N to change"
        print(f"note: {threads} torch CPU thread(s) {why}", file=sys.stderr)
    return threads


def set_threads_for(model_dir: str | None, requested: int | None, quiet: bool = False) -> int:
    """Set torch's CPU threads for the model in ``model_dir`` (its ``config.json``) and say so on stderr."""
    params = None
    if model_dir is not None and requested is None:
        try:
            from transformers import AutoConfig

            params = approx_parameters(AutoConfig.from_pretrained(model_dir))
        except (OSError, ValueError, AttributeError):
            params = None  # unreadable here: the model loader reports it properly later
    return apply_threads(params, requested, quiet)
