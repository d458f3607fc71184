"""What a self-speculative round costs in plain decoding steps, measured on the machine as it is now.

``bench cost_model`` times the model's passes in isolation on a quiet core; this times whole decoder rounds
(verification of ``k`` proposed tokens, acceptance, cache rollback) against the vanilla loop's steps, at a
given context, with the shipped draft and the streaming kernel, so it shows what the decoder really pays
under the machine's current load (a job on the other core shares the memory bus). Every pass is timed on
its own; the settings (context x attention backend x k) take turns within each repeat, so slow spells of a
shared machine fall on all of them; medians over every repeat. ``--attention sdpa kangaroo_sdpa`` compares
HF's ``sdpa`` with the grouped-head variant the model uses (``kangaroo_lit.attention``)::

    python scripts/bench/round_cost.py --artifact drafts/smollm2-135m-instruct --context 128 600 1200 \\
        --ks 0 1 3 6 --attention sdpa kangaroo_sdpa
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from kangaroo_lit.cli_scaffold import kernel_linears
from kangaroo_lit.decoding import SelfSpeculativeDecoder
from kangaroo_lit.decoding.drafters import Drafter, Proposal
from kangaroo_lit.decoding.result import DecodeResult
from kangaroo_lit.decoding.sampling import SamplingConfig
from kangaroo_lit.decoding.vanilla import reference_model
from kangaroo_lit.draft import load_draft


class CopyLast(Drafter):
    """Proposes the last ``k`` committed tokens (as prompt lookup would), never the draft path."""

    uses_draft_path = False

    def __init__(self, k: int):
        self.k = k

    def propose(self, model, state, budget, sampling, generator) -> Proposal:
        tokens = state.committed[:, -self.k:] if self.k else state.committed[:, :0]
        return Proposal(tokens=tokens, probs=None, source="lookup")


def set_attention(model, name: str) -> None:
    """Run the base and the adapter on the attention backend ``name`` (both registered already)."""
    model.causal_lm.config._attn_implementation = name
    model.adapter.config._attn_implementation = name


def vanilla_steps(model, ids: torch.Tensor, steps: int) -> list[float]:
    """Seconds of each of ``steps`` one-token steps of the verifying model after the prompt ``ids``."""
    times = []
    with reference_model(model) as lm:
        cache = DynamicCache()
        out = lm(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        for _ in range(steps):
            start = time.perf_counter()
            out = lm(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            times.append(time.perf_counter() - start)
    return times


def round_times(model, ids: torch.Tensor, k: int, rounds: int) -> list[float]:
    """Seconds of each of ``rounds`` decoder rounds verifying ``k + 1`` tokens after the prompt ``ids``."""
    sampling = SamplingConfig()
    decoder = SelfSpeculativeDecoder(model, drafter=CopyLast(k))
    result = DecodeResult()
    state = decoder._prefill(ids, sampling, None, result, set(), 10**6)
    times = []
    for i in range(rounds):
        start = time.perf_counter()
        decoder._round(state, i + 1, sampling, None, result, set(), 10**6)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default="drafts/smollm2-135m-instruct")
    parser.add_argument("--context", type=int, nargs="+", default=[128, 500])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 3, 7])
    parser.add_argument("--attention", nargs="+", default=None,
                        help="attention backends to compare (default: the model's own)")
    parser.add_argument("--kernel", default="streaming")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_draft(args.artifact).model
    backends = args.attention or [model.config._attn_implementation]
    times: dict[tuple[int, str, str], list[float]] = {}
    with kernel_linears(model, args.kernel), torch.inference_mode():
        for _ in range(args.repeats):
            for context in args.context:
                ids = torch.randint(100, model.config.vocab_size, (1, context),
                                    generator=torch.Generator().manual_seed(0))
                for backend in backends:
                    set_attention(model, backend)
                    times.setdefault((context, backend, "vanilla step"), []).extend(
                        vanilla_steps(model, ids, args.rounds))
                    for k in args.ks:
                        times.setdefault((context, backend, f"round verifying {k + 1}"), []).extend(
                            round_times(model, ids, k, args.rounds))
    step = {(c, b): statistics.median(times[(c, b, "vanilla step")]) for c in args.context for b in backends}
    reference = backends[0]
    for (context, backend, name), values in times.items():
        value = statistics.median(values)
        print(f"context {context}, {backend}: {name}: {value * 1000:.1f} ms = {value / step[(context, backend)]:.2f} "
              f"of its vanilla step, {value / step[(context, reference)]:.2f} of {reference}'s")


if __name__ == "__main__":
    main()
