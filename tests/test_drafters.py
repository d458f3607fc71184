"""The drafter interface: whatever a drafter proposes, the decoder's output stays exact.

Verification, acceptance, rollback and the draft path's pending positions are written once in the
decoder; these tests drive them with drafters that the adapter tests do not cover: prompt lookup alone
(rounds without a match are plain one-token steps) and a drafter proposing arbitrary tokens of any
length from a random ``q`` without touching the draft path. Greedy: token-identical to HF ``generate``
in float64 on every architecture and LoRA mode. Sampling: the first tokens' joint distribution equals
the full model's.
"""

import random
from collections import Counter

import pytest
import torch

from kangaroo_lit.decoding import RoundInfo, SelfSpeculativeDecoder, make_drafter
from kangaroo_lit.decoding.drafters import Drafter, LookupDrafter, LookupThenAdapter, Proposal
from kangaroo_lit.decoding.sampling import SamplingConfig
from tests.conftest import ARCHITECTURES, build_decoding_model, greedy_reference
from tests.helpers import SAMPLING_TV_BOUND, build_small_model, exact_distribution, repeating_prompt, total_variation

pytestmark = pytest.mark.usefixtures("one_thread")


class RandomDrafter(Drafter):
    """Proposes 0..``max_len`` tokens drawn from a fixed random ``q`` per round (a drafter that never
    runs the draft path, so every accepted token becomes pending for nobody: the adapter is never run)."""

    def __init__(self, vocab: int, max_len: int, seed: int):
        self.rng = torch.Generator().manual_seed(seed)
        self.q = torch.rand(vocab, generator=self.rng, dtype=torch.float64).pow(3)
        self.q /= self.q.sum()
        self.max_len = max_len
        self.updates: list[tuple[int, int]] = []

    def propose(self, model, state, budget, sampling, generator) -> Proposal:
        k = int(torch.randint(0, self.max_len + 1, (1,), generator=self.rng))
        k = min(k, budget)
        tokens = torch.multinomial(self.q, k, replacement=True, generator=self.rng) if k else state.committed[0, :0]
        probs = None if sampling.greedy else self.q.expand(k, -1).clone()
        return Proposal(tokens=tokens[None].to(state.committed.dtype), probs=probs, source="random")

    def update(self, proposal: Proposal, accepted: int) -> None:
        self.updates.append((proposal.size, accepted))


@pytest.mark.parametrize("arch_index", range(len(ARCHITECTURES)), ids=ARCHITECTURES)
def test_lookup_only_and_arbitrary_drafters_are_greedy_exact(arch_index, tiny_model_dirs):
    arch = ARCHITECTURES[arch_index]
    rng = random.Random(500 + arch_index)
    seen: Counter = Counter()
    for m, mode in enumerate(("off", "draft", "shared")):
        model = build_decoding_model(tiny_model_dirs[arch], (arch_index + m) % 3, mode, seed=arch_index * 7 + m)
        vocab = model.config.vocab_size
        for case in range(4):
            ids = repeating_prompt(rng, vocab)
            max_new = rng.randint(8, 20)
            reference = greedy_reference(model, ids, max_new)
            for drafter in (make_drafter("lookup", prompt_lookup=rng.choice([1, 3, 5]), prompt_lookup_ngram=(1, 3)),
                            RandomDrafter(vocab, max_len=4, seed=case),
                            LookupThenAdapter(LookupDrafter(3, (2, 3)), make_drafter("adapter", 0.0, 2))):
                rounds: list[RoundInfo] = []
                result = SelfSpeculativeDecoder(model, drafter=drafter, on_round=rounds.append).generate(ids, max_new)
                assert result.tokens == reference, (arch, mode, case, type(drafter).__name__)
                assert sum(result.accept_lengths) == len(result.tokens) == max_new
                assert len(rounds) == result.full_passes
                committed = rounds[-1].committed_length - 1
                assert rounds[-1].cache_lengths["deep"] == [committed] * len(rounds[-1].cache_lengths["deep"])
                if isinstance(drafter, LookupDrafter):
                    assert result.draft_steps == 0  # the draft path never runs
                    assert result.drafted == result.lookup_drafted
                    seen["plain_step"] += sum(not r.drafted for r in rounds[1:])
                    seen["lookup_accepted"] += result.lookup_accepted > 0
                if isinstance(drafter, RandomDrafter):
                    assert [d for d, _ in drafter.updates] == [len(r.drafted) for r in rounds[1:]]
                    assert [a for _, a in drafter.updates] == [r.accepted for r in rounds[1:]]
    assert seen["plain_step"] > 0 and seen["lookup_accepted"] > 0, seen


def test_make_drafter_refuses_inconsistent_settings():
    with pytest.raises(ValueError, match="drafter must be one of adapter, lookup, tree"):
        make_drafter("beam")
    with pytest.raises(ValueError, match="needs prompt_lookup >= 1"):
        make_drafter("lookup", prompt_lookup=0)
    with pytest.raises(ValueError, match="max_draft"):
        make_drafter("adapter", max_draft=0)
    assert isinstance(make_drafter("adapter", prompt_lookup=3), LookupThenAdapter)


# The shared scope's run (pending shallow states) is the slower one: slow tier, as the other long draws.
@pytest.mark.parametrize("mode", ["off", pytest.param("shared", marks=pytest.mark.slow)])
def test_sampling_is_exact_with_an_arbitrary_drafter(mode):
    """Random proposals of 0-3 tokens from a fixed q: the first three tokens follow the full model."""
    prompt, first = [1, 5, 7], 3
    sampling = SamplingConfig(temperature=1.0, top_k=3)
    model = build_small_model(mode)
    exact = exact_distribution(model, prompt, sampling, first)
    drafter = RandomDrafter(model.config.vocab_size, max_len=3, seed=4)
    decoder = SelfSpeculativeDecoder(model, drafter=drafter)
    generator = torch.Generator().manual_seed(5)
    counts: Counter = Counter()
    for _ in range(2500):
        result = decoder.generate(torch.tensor([prompt]), first + 1, temperature=1.0, top_k=3, generator=generator)
        counts[tuple(result.tokens[:first])] += 1
    accepted = sum(a for _, a in drafter.updates)
    rejected = sum(d > a for d, a in drafter.updates)
    assert accepted > 0 and rejected > 0
    assert total_variation(counts, exact) < SAMPLING_TV_BOUND


@pytest.mark.parametrize("arch_index", range(len(ARCHITECTURES)), ids=ARCHITECTURES)
def test_skipping_unpromising_drafts_is_greedy_exact(arch_index, tiny_model_dirs):
    """skip_below: rounds whose first draft is not confident enough are plain steps; output unchanged,
    also with a calibration temperature on the model."""
    from tests.helpers import noisy_oracle

    arch = ARCHITECTURES[arch_index]
    rng = random.Random(900 + arch_index)
    skipped = verified = 0
    for m, mode in enumerate(("off", "draft", "shared")):
        model = build_decoding_model(tiny_model_dirs[arch], (arch_index + m) % 3, mode, seed=arch_index * 5 + m)
        model.confidence_temperature = (0.7, 1.0, 2.5)[m]
        for case in range(3):
            ids = repeating_prompt(rng, model.config.vocab_size)
            max_new = rng.randint(10, 20)
            reference = greedy_reference(model, ids, max_new)
            rounds: list[RoundInfo] = []
            drafter = make_drafter("adapter", threshold=0.3, max_draft=3, skip_below=0.5,
                                   prompt_lookup=2 if case == 2 else 0,
                                   draft_logits_fn=noisy_oracle(reference, ids.shape[1], seed=case))
            result = SelfSpeculativeDecoder(model, drafter=drafter, on_round=rounds.append).generate(ids, max_new)
            assert result.tokens == reference, (arch, mode, case)
            skipped += sum(not r.drafted for r in rounds[1:])
            verified += sum(bool(r.drafted) and not r.lookup for r in rounds[1:])
            assert result.draft_steps >= result.drafted - result.lookup_drafted
    assert skipped > 0 and verified > 0, (skipped, verified)


def test_sampling_is_exact_with_skipped_drafts():
    prompt, first = [1, 5, 7], 3
    sampling = SamplingConfig(temperature=1.0, top_k=3)
    model = build_small_model("off")
    exact = exact_distribution(model, prompt, sampling, first)
    rounds: Counter = Counter()

    def note(info: RoundInfo) -> None:
        if info.index:
            rounds["skipped" if not info.drafted else "verified"] += 1

    drafter = make_drafter("adapter", threshold=0.0, max_draft=2, skip_below=0.6)
    decoder = SelfSpeculativeDecoder(model, drafter=drafter, on_round=note)
    generator = torch.Generator().manual_seed(6)
    counts: Counter = Counter()
    for _ in range(2500):
        result = decoder.generate(torch.tensor([prompt]), first + 1, temperature=1.0, top_k=3, generator=generator)
        counts[tuple(result.tokens[:first])] += 1
    assert rounds["skipped"] > 0 and rounds["verified"] > 0, rounds
    assert total_variation(counts, exact) < SAMPLING_TV_BOUND
