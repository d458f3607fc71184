"""Prompt lookup inside the self-speculative decoder: copied drafts keep output exact.

Greedy: token-identical to HF ``generate`` in float64 on every architecture and LoRA mode, with lookup
rounds (accepted and rejected) mixed with adapter rounds, so the draft path's catch-up over several
pending tokens is exercised. Sampling: the joint distribution of the first tokens equals the full
model's (a copied token is a draft from a point mass).
"""

import random
from collections import Counter

import pytest
import torch

from kangaroo_lit.decoding import RoundInfo, SelfSpeculativeDecoder
from kangaroo_lit.decoding.prompt_lookup import lookup_continuation
from kangaroo_lit.decoding.sampling import SamplingConfig
from tests.conftest import ARCHITECTURES, build_decoding_model, greedy_reference
from tests.helpers import SAMPLING_TV_BOUND as BOUND
from tests.helpers import build_small_model, exact_distribution, noisy_oracle, total_variation

pytestmark = pytest.mark.usefixtures("one_thread")


def t(*ids: int) -> torch.Tensor:
    return torch.tensor(ids)


def test_lookup_continuation_picks_longest_then_latest_full_match():
    # The 3-gram (1, 2, 3) occurred at 0; the 2-gram (2, 3) also at 5; the longer match wins.
    assert lookup_continuation(t(1, 2, 3, 9, 8, 2, 3, 7, 1, 2, 3), 2).tolist() == [9, 8]
    # Only 2-grams match: the latest occurrence wins.
    assert lookup_continuation(t(2, 3, 4, 5, 2, 3, 6, 2, 3), 3).tolist() == [6, 2, 3]
    # The latest occurrence with max_tokens after it: in a cycle, a whole period ahead, not the last token.
    assert lookup_continuation(t(4, 4, 4, 4, 4, 4), 3).tolist() == [4, 4, 4]
    assert lookup_continuation(t(1, 2, 3, 1, 2, 3, 1, 2), 4).tolist() == [3, 1, 2]
    # Fewer tokens after the match than asked: what there is.
    assert lookup_continuation(t(5, 2, 3, 4, 2, 3), 10).tolist() == [4, 2, 3]
    # No earlier occurrence of any n-gram >= min_ngram: nothing.
    assert lookup_continuation(t(1, 2, 3, 4, 3), 5).numel() == 0
    assert lookup_continuation(t(1, 2, 3, 4, 3), 5, min_ngram=1).tolist() == [4, 3]
    assert lookup_continuation(t(7), 4, min_ngram=1).numel() == 0
    with pytest.raises(ValueError, match="min_ngram"):
        lookup_continuation(t(1, 2), 3, min_ngram=3, max_ngram=2)


def repetitive_prompt(rng: random.Random, vocab: int) -> torch.Tensor:
    """Random tokens with a few repeated chunks, so n-grams of the prompt (and often the output) recur."""
    chunks = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))] for _ in range(3)]
    ids: list[int] = []
    for _ in range(rng.randint(3, 6)):
        ids += rng.choice(chunks) + [rng.randrange(3, vocab)] * rng.randint(0, 1)
    return torch.tensor([ids])


@pytest.mark.parametrize("arch_index", range(len(ARCHITECTURES)), ids=ARCHITECTURES)
def test_greedy_with_prompt_lookup_equals_generate(arch_index, tiny_model_dirs):
    arch = ARCHITECTURES[arch_index]
    rng = random.Random(77 + arch_index)
    events: Counter = Counter()
    for m, mode in enumerate(("off", "draft", "shared")):
        model = build_decoding_model(tiny_model_dirs[arch], (arch_index + m) % 3, mode, seed=arch_index * 10 + m)
        for case in range(5):
            ids = repetitive_prompt(rng, model.config.vocab_size)
            max_new = rng.randint(10, 24)
            reference = greedy_reference(model, ids, max_new)
            rounds: list[RoundInfo] = []
            decoder = SelfSpeculativeDecoder(
                model, threshold=0.6, max_draft=rng.choice([1, 4]), on_round=rounds.append,
                draft_logits_fn=noisy_oracle(reference, ids.shape[1], seed=case) if case % 2 else None,
                prompt_lookup=rng.choice([1, 3, 7]), prompt_lookup_ngram=(1, 3) if case % 3 == 0 else (2, 3),
            )
            result = decoder.generate(ids, max_new)
            assert result.tokens == reference, (arch, mode, case)
            assert sum(result.accept_lengths) == len(result.tokens) == max_new
            assert result.drafted == sum(len(r.drafted) for r in rounds)
            assert result.lookup_drafted == sum(len(r.drafted) for r in rounds if r.lookup)
            assert result.lookup_accepted == sum(r.accepted for r in rounds if r.lookup)
            assert result.draft_steps == result.drafted - result.lookup_drafted
            for before, info in zip(rounds, rounds[1:]):
                assert info.committed_length == before.committed_length + info.accepted + 1
                kind = "lookup" if info.lookup else "adapter"
                events[f"{kind}_accepted"] += info.accepted > 0
                events[f"{kind}_rejected"] += info.accepted < len(info.drafted)
                # an adapter round right after a lookup round catches the draft path up over several tokens
                events["catch_up"] += (not info.lookup) and before.lookup and before.accepted > 0
    assert all(events[e] > 0 for e in ("lookup_accepted", "lookup_rejected", "adapter_accepted",
                                       "adapter_rejected", "catch_up")), events


@pytest.mark.parametrize("mode", ["off", "draft", "shared"])
def test_draft_path_catches_up_after_lookup_rounds(mode, tiny_model_dirs):
    """Every adapter draft after lookup rounds sees exactly the context a cache-free draft path sees."""
    torch.manual_seed(0)  # LoRA A and the adapter's other weights come from the global generator
    model = build_decoding_model(tiny_model_dirs["llama"], exit_layer=1, mode=mode, seed=5)
    covered = Counter()
    for ids in ([[5, 17, 42, 99, 7, 5, 17, 42, 3, 64, 5, 17]], [[9, 8, 7, 9, 8, 7, 9, 8]], [[4, 4, 4, 4, 4, 4]]):
        ids = torch.tensor(ids)
        prompt, max_new = ids.shape[1], 30
        reference = greedy_reference(model, ids, max_new)
        with torch.inference_mode():
            teacher_forced = model(torch.cat([ids, torch.tensor([reference])], dim=1)).exit_logits[0]
        rounds: list[RoundInfo] = []

        def oracle(logits, position, reference=reference, teacher_forced=teacher_forced, prompt=prompt):
            # Drafts are always right, so every draft's context is the reference: compare, then draft it.
            torch.testing.assert_close(logits[0], teacher_forced[position - 1], rtol=1e-9, atol=1e-9)
            out = torch.full_like(logits, -30.0)
            out[:, reference[position - prompt]] = 30.0
            return out

        decoder = SelfSpeculativeDecoder(model, threshold=0.6, max_draft=3, draft_logits_fn=oracle,
                                         on_round=rounds.append, prompt_lookup=4, prompt_lookup_ngram=(1, 3))
        assert decoder.generate(ids, max_new).tokens == reference
        # an adapter round right after a lookup round that accepted copies: several pending positions
        covered["catch_up"] += sum(b.lookup and b.accepted > 0 and not r.lookup for b, r in zip(rounds, rounds[1:]))
        final = rounds[-1]
        committed = final.committed_length - 1
        assert final.cache_lengths["deep"] == [committed] * 2
        assert final.cache_lengths["adapter"] == [committed - final.pending["adapter"]]
    assert covered["catch_up"] > 0


# About 70 s on 2 loaded cores: slow tier, as the restricted-head distribution test.
@pytest.mark.slow
@pytest.mark.parametrize("sized", [False, True], ids=["fixed-window", "cost-sized-window"])
def test_sampling_with_prompt_lookup_matches_full_model_distribution(sized):
    """Prompt [1, 5, 7, 1, 5]: the first round copies 7, ... (n-gram (1, 5)); tokens vary after it. Sized by a
    cost model, the window of a round depends on what earlier rounds accepted: still exact."""
    from kangaroo_lit.decoding import make_drafter
    from kangaroo_lit.decoding.cost import DecodeCost

    prompt = [1, 5, 7, 1, 5]
    first = 3
    sampling = SamplingConfig(temperature=1.0, top_k=3)
    model = build_small_model("draft")
    exact = exact_distribution(model, prompt, sampling, first)
    lookups: Counter = Counter()

    def note(info: RoundInfo) -> None:
        if info.lookup:
            lookups["rounds"] += 1
            lookups["accepted"] += info.accepted
            lookups["rejected"] += info.accepted < len(info.drafted)

    cost = DecodeCost(draft_step=0.1, verify={2: 1.05, 4: 1.4}) if sized else None
    decoder = SelfSpeculativeDecoder(model, on_round=note, drafter=make_drafter(
        "adapter", 0.0, 2, prompt_lookup=3, prompt_lookup_ngram=(1, 2), lookup_cost=cost))
    generator = torch.Generator().manual_seed(3)
    counts: Counter = Counter()
    for _ in range(2500):
        result = decoder.generate(torch.tensor([prompt]), first + 1, temperature=1.0, top_k=3, generator=generator)
        counts[tuple(result.tokens[:first])] += 1
    assert lookups["accepted"] > 0 and lookups["rejected"] > 0, lookups
    tv = total_variation(counts, exact)
    assert tv < BOUND, f"TV {tv:.3f} between speculative sampling with prompt lookup and the full model"


# ---------------------------------------------------------------------------------------------------
# The window sized by the cost model (LookupDrafter with a DecodeCost)


def _proposal(size: int):
    from kangaroo_lit.decoding.drafters import Proposal

    return Proposal(tokens=torch.zeros(1, size, dtype=torch.long), probs=None, source="lookup")


def test_running_acceptance_rates_count_each_judged_copy():
    from kangaroo_lit.decoding.cost import DecodeCost
    from kangaroo_lit.decoding.drafters import LookupDrafter

    drafter = LookupDrafter(3, cost=DecodeCost(draft_step=0.1, verify={2: 1.0, 4: 1.0}))
    assert drafter.acceptance_rates() == [0.5, 0.5, 0.5]  # the prior, before any round
    for accepted in (3, 1, 0, 3):
        drafter.update(_proposal(3), accepted)
    # copy 1 judged in 4 rounds, kept in 3; copy 2 judged in 3 (after an accepted copy 1), kept in 2;
    # copy 3 judged in 2, kept in 2; each shrunk toward the rate before it, worth 2 rounds.
    r1 = (3 + 2 * 0.5) / (4 + 2)
    r2 = (2 + 2 * r1) / (3 + 2)
    r3 = (2 + 2 * r2) / (2 + 2)
    assert drafter.acceptance_rates() == pytest.approx([r1, r2, r3])
    drafter.update(_proposal(1), 0)  # a one-token proposal judges copy 1 only
    assert drafter.judged == [5, 3, 2] and drafter.kept == [3, 2, 2]
    drafter.start()
    assert drafter.acceptance_rates() == [0.5, 0.5, 0.5]


def test_window_follows_cost_and_acceptance():
    from kangaroo_lit.decoding.cost import DecodeCost
    from kangaroo_lit.decoding.drafters import LookupDrafter

    flat = LookupDrafter(7, cost=DecodeCost(draft_step=0.1, verify={2: 1.0, 8: 1.0}))  # a GPU's v_k
    steep = LookupDrafter(7, cost=DecodeCost(draft_step=0.1, verify={2: 1.1, 8: 2.5}))  # a loaded CPU core's
    assert flat.window(7) == 7 and flat.window(3) == 3  # verifying more costs nothing: all the match offers
    assert 0 < steep.window(7) < 7  # at the prior's 1/2 a few copies pay, not seven
    for _ in range(30):  # copies that always fail: no window pays
        steep.update(_proposal(1), 0)
    assert steep.window(7) == 0
    steep.start()
    for _ in range(30):  # copies that always hold: the whole match pays, however steep
        steep.update(_proposal(7), 7)
    assert steep.window(7) == 7 and steep.window(2) == 2


@pytest.mark.parametrize("arch_index", range(len(ARCHITECTURES)), ids=ARCHITECTURES)
def test_greedy_with_cost_sized_lookup_windows_equals_generate(arch_index, tiny_model_dirs):
    """Windows of every size, none included, with lookup alone and with the adapter; the output stays
    exact, and a drafter reused for a second output decodes it exactly as a fresh one (``start``)."""
    from kangaroo_lit.decoding import make_drafter
    from kangaroo_lit.decoding.cost import DecodeCost

    arch = ARCHITECTURES[arch_index]
    rng = random.Random(300 + arch_index)
    # A loaded CPU core's costs (most matches pay a few copies) and steeper ones (some pay nothing).
    costs = [DecodeCost(draft_step=0.15, verify={2: 1.05, 4: 1.4, 8: 2.4}),
             DecodeCost(draft_step=0.15, verify={2: 1.6, 4: 2.2, 8: 3.5})]
    windows: Counter = Counter()
    for m, mode in enumerate(("off", "draft", "shared")):
        model = build_decoding_model(tiny_model_dirs[arch], (arch_index + m) % 3, mode, seed=arch_index * 3 + m)
        for case in range(3):
            ids = repetitive_prompt(rng, model.config.vocab_size)
            max_new = rng.randint(12, 24)
            reference = greedy_reference(model, ids, max_new)
            for kind, cost in zip(("lookup", "adapter"), costs if case % 2 else costs[::-1]):
                drafter = make_drafter(kind, 0.0, 2, prompt_lookup=7, prompt_lookup_ngram=(1, 3), lookup_cost=cost)
                lookup = drafter if kind == "lookup" else drafter.lookup
                def recorded(offered, sized=lookup.window):
                    k = sized(offered)
                    windows[(offered, k)] += 1
                    return k

                lookup.window = recorded
                decoder = SelfSpeculativeDecoder(model, drafter=drafter)
                first = decoder.generate(ids, max_new)
                assert first.tokens == reference, (arch, mode, case, kind)
                again = decoder.generate(ids, max_new)
                fresh = SelfSpeculativeDecoder(model, drafter=make_drafter(
                    kind, 0.0, 2, prompt_lookup=7, prompt_lookup_ngram=(1, 3), lookup_cost=cost)).generate(ids, max_new)
                assert again.tokens == reference
                assert again.accept_lengths == fresh.accept_lengths == first.accept_lengths
    chosen = Counter(k for (offered, k), n in windows.items() for _ in range(n))
    assert chosen[0] > 0, windows  # some matches were not worth verifying
    assert any(0 < k < offered for offered, k in windows), windows  # some were cut short
    assert any(k == offered > 1 for offered, k in windows), windows  # some were verified whole


def test_a_closed_window_is_tried_again_after_a_run_of_closed_matches():
    from kangaroo_lit.decoding.cost import DecodeCost
    from kangaroo_lit.decoding.drafters import DecodingState, LookupDrafter

    drafter = LookupDrafter(4, ngram=(1, 3), cost=DecodeCost(draft_step=0.1, verify={2: 1.3, 8: 3.0}))
    for _ in range(30):
        drafter.update(_proposal(1), 0)  # copies that failed: the window is closed
    committed = torch.tensor([[5, 6, 7, 8, 5, 6, 7]])  # "5 6 7" occurred before: the match offers "8 5 6 7"
    state = DecodingState(caches={}, committed=committed, pending_ids=committed[:, :0],
                          pending_hidden=torch.zeros(1, 0, 4))
    rounds = 2 * (drafter.EXPLORE_AFTER + 1)
    sizes = [drafter.propose(None, state, 8, SamplingConfig(), None).size for _ in range(rounds)]
    assert sizes == ([0] * drafter.EXPLORE_AFTER + [1]) * 2
