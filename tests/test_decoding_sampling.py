"""Speculative sampling keeps the full model's output distribution exactly (DESIGN.md §3.5).

A 2-layer model with a 12-token vocabulary, top-k 3 at temperature 1: the first three generated tokens
have 27 possible values whose exact probabilities under the verifying model are enumerated. Thousands
of draws of the speculative decoder must match them in total variation, with rejections happening;
the same decoder with a wrong acceptance rule (always accept) must fail the same bound.
"""

from collections import Counter

import pytest
import torch

from kangaroo_lit.architectures import load_base_model
from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder, probabilities
from kangaroo_lit.decoding.sampling import SamplingConfig
from kangaroo_lit.model import KangarooModel
from tests import helpers
from tests.helpers import SAMPLING_TV_BOUND, build_small_model, total_variation

PROMPT = [1, 5, 7]
TOP_K = 3
FIRST = 3  # tokens whose joint distribution is compared
NEW_TOKENS = 4  # > FIRST, so the first round drafts two tokens (budget cap: remaining - 1)
MAX_DRAFT = 2
BOUND = SAMPLING_TV_BOUND


pytestmark = pytest.mark.usefixtures("one_thread")


# A restricted draft head (draft.vocab_size K = 6 of the 12 ids): q is zero outside it, and the output
# must still follow the full model exactly.
DRAFT_VOCAB = torch.tensor([0, 2, 3, 5, 7, 10])


@pytest.fixture(scope="module")
def small_model():
    return build_small_model()


def exact_distribution(model, sampling: SamplingConfig, first: int = FIRST) -> dict[tuple[int, ...], float]:
    """P(first ``first`` tokens after PROMPT) under the verifying model."""
    return helpers.exact_distribution(model, PROMPT, sampling, first)


class AlwaysAccept(SelfSpeculativeDecoder):
    """A wrong rule: every draft is accepted, the bonus sampled from the full model."""

    def accept_drafts(self, draft_tokens, draft_probs, target_logits, sampling, generator):
        k = draft_tokens.shape[0]
        bonus = torch.multinomial(probabilities(target_logits[k], sampling), 1, generator=generator)
        return k, int(bonus)


def draw(
    decoder, draws: int, seed: int, sampling: SamplingConfig, new_tokens: int = NEW_TOKENS, first: int = FIRST
) -> tuple[Counter, int, int]:
    generator = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    drafted = accepted = 0
    for _ in range(draws):
        result = decoder.generate(
            torch.tensor([PROMPT]),
            new_tokens,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            generator=generator,
        )
        counts[tuple(result.tokens[:first])] += 1
        drafted += result.drafted
        accepted += result.accepted
    return counts, drafted, accepted


@pytest.fixture(scope="module")
def restricted_model():
    return build_small_model(draft_vocab=DRAFT_VOCAB)


# The restricted-head run costs as much as the full one (~40 s on 2 cores): slow tier (`-m slow`), to keep
# CI near its budget; the restricted head's greedy exactness stays in the default tier (test_decoding_greedy).
@pytest.mark.parametrize("head", ["full", pytest.param("k6", marks=pytest.mark.slow)])
def test_speculative_sampling_matches_full_model_distribution(head, request):
    small_model = request.getfixturevalue("small_model" if head == "full" else "restricted_model")
    sampling = SamplingConfig(temperature=1.0, top_k=TOP_K)
    exact = exact_distribution(small_model, sampling)
    assert len(exact) == TOP_K**FIRST
    assert abs(sum(exact.values()) - 1.0) < 1e-9

    drafts = set()
    decoder = SelfSpeculativeDecoder(small_model, threshold=0.0, max_draft=MAX_DRAFT,
                                     on_round=lambda info: drafts.update(info.drafted))
    # Fewer draws for the restricted head (runtime); seeded, its TV is about 0.05.
    counts, drafted, accepted = draw(decoder, 3000 if head == "full" else 2000, seed=1, sampling=sampling)
    if head != "full":
        assert drafts <= set(DRAFT_VOCAB.tolist())  # q is zero outside the draft vocabulary
        assert any(k not in drafts for k in (tok for key in exact for tok in key))  # yet p reaches beyond it
    tv = total_variation(counts, exact)
    assert drafted > accepted > 0, "both acceptances and rejections must happen"
    assert tv < BOUND, f"TV {tv:.3f} between speculative sampling and the full model"

    # The same bound has teeth: a wrong acceptance rule is far off.
    wrong = AlwaysAccept(small_model, threshold=0.0, max_draft=MAX_DRAFT)
    wrong_counts, _, _ = draw(wrong, 200, seed=2, sampling=sampling)
    wrong_tv = total_variation(wrong_counts, exact)
    assert wrong_tv > 2 * BOUND, f"always-accept TV {wrong_tv:.3f} should fail the bound {BOUND}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["off", "draft", "shared"])
@pytest.mark.parametrize(
    "sampling",
    [SamplingConfig(temperature=1.0, top_k=3), SamplingConfig(temperature=0.8, top_p=0.7)],
    ids=["top_k3", "top_p0.7"],
)
def test_speculative_sampling_distribution_many_draws(mode, sampling):
    """20000 draws of four tokens, with longer rounds, for each LoRA mode."""
    model = build_small_model(mode)
    exact = exact_distribution(model, sampling, first=4)
    decoder = SelfSpeculativeDecoder(model, threshold=0.3, max_draft=4)
    counts, drafted, accepted = draw(decoder, 20000, seed=11, sampling=sampling, new_tokens=6, first=4)
    assert drafted > accepted > 0
    assert total_variation(counts, exact) < 0.04


def test_vanilla_sampling_equals_hf_generate_sampling(tiny_model_dirs):
    """Same seed, same warping order: the vanilla loop draws exactly HF generate's samples."""
    base = load_base_model(str(tiny_model_dirs["llama"]), "float32")
    base.generation_config.eos_token_id = None
    base.generation_config.pad_token_id = 0
    model = KangarooModel(base, exit_layer=1).eval()
    ids = torch.tensor([[1, 50, 60, 70]])
    for kwargs in (dict(top_k=3), dict(top_p=0.8), dict(temperature=0.7, top_k=20, top_p=0.9)):
        kwargs = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kwargs}
        torch.manual_seed(3)
        expected = base.generate(ids, max_new_tokens=16, do_sample=True, **{**kwargs, "top_k": kwargs["top_k"] or None})
        torch.manual_seed(3)
        assert VanillaDecoder(model).generate(ids, 16, **kwargs).tokens == expected[0, ids.shape[1] :].tolist()


def test_sampling_is_reproducible_with_a_generator(small_model):
    decoder = SelfSpeculativeDecoder(small_model, threshold=0.3, max_draft=4)
    runs = [
        decoder.generate(
            torch.tensor([PROMPT]), 12, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(7)
        ).tokens
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert len(runs[0]) == 12


def test_threshold_uses_warped_draft_probabilities(small_model):
    # top_k=1 makes every warped draft distribution one-hot (top-1 probability 1), so even a threshold
    # just below 1 never stops a round early: rounds draft max_draft (or the budget's cap).
    drafted = []
    decoder = SelfSpeculativeDecoder(
        small_model, threshold=0.999, max_draft=3, on_round=lambda info: drafted.append(len(info.drafted))
    )
    decoder.generate(torch.tensor([PROMPT]), 9, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert drafted[0] == 0 and max(drafted[1:]) == 3
