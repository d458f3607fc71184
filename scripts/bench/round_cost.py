"""What a self-speculative round costs in plain decoding steps, measured on the machine as it is now.

``bench cost_model`` times the model's passes in isolation on a quiet core; this times whole decoder rounds
(verification of ``k`` proposed tokens, acceptance, cache rollback) against the vanilla loop's steps, at a
given context, with the shipped draft and the streaming kernel, so it shows what the decoder really pays
under the machine's current load (a job on the other core shares the memory bus)::

    python scripts/bench/round_cost.py --artifact drafts/smollm2-135m-instruct --context 128 500 --ks 0 1 3 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kangaroo_lit.cli_scaffold import kernel_linears
from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder
from kangaroo_lit.decoding.drafters import Drafter, Proposal
from kangaroo_lit.decoding.result import DecodeResult
from kangaroo_lit.decoding.sampling import SamplingConfig
from kangaroo_lit.draft import load_draft


class CopyLast(Drafter):
    """Proposes the last ``k`` committed tokens (as prompt lookup would), never the draft path."""

    uses_draft_path = False

    def __init__(self, k: int):
        self.k = k

    def propose(self, model, state, budget, sampling, generator) -> Proposal:
        tokens = state.committed[:, -self.k:] if self.k else state.committed[:, :0]
        return Proposal(tokens=tokens, probs=None, source="lookup")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default="drafts/smollm2-135m-instruct")
    parser.add_argument("--context", type=int, nargs="+", default=[128, 500])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 3, 7])
    parser.add_argument("--kernel", default="streaming")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_draft(args.artifact).model
    sampling = SamplingConfig()
    with kernel_linears(model, args.kernel), torch.inference_mode():
        for context in args.context:
            ids = torch.randint(100, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
            times: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                vanilla = VanillaDecoder(model)
                one, many = vanilla.generate(ids, 1), vanilla.generate(ids, args.rounds + 1)
                times.setdefault("vanilla step", []).append((many.wall_time_s - one.wall_time_s) / args.rounds)
                for k in args.ks:
                    decoder = SelfSpeculativeDecoder(model, drafter=CopyLast(k))
                    result = DecodeResult()
                    state = decoder._prefill(ids, sampling, None, result, set(), 10**6)
                    rounds = []
                    for i in range(args.rounds):
                        start = time.perf_counter()
                        decoder._round(state, i + 1, sampling, None, result, set(), 10**6)
                        rounds.append(time.perf_counter() - start)
                    times.setdefault(f"round verifying {k + 1} tokens", []).append(statistics.median(rounds))
            step = statistics.median(times["vanilla step"])
            for name, values in times.items():
                value = statistics.median(values)
                print(f"context {context}: {name}: {value * 1000:.1f} ms = {value / step:.2f} plain steps")


if __name__ == "__main__":
    main()
