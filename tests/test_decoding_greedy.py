"""Greedy self-speculative decoding is token-identical to HF ``generate`` of the verifying model.

Float64 tiny random models of every supported architecture (DESIGN.md §3: exactness tests in float64,
so a multi-token verification pass and one-token decoding cannot round differently). LoRA B and the
adapter's ``o_proj`` are perturbed so the draft path differs from plain early exit; an untrained draft
on a random model is rarely right, so a "noisy oracle" draft hook (right with probability 3/4, with
varied confidence) also makes long accepted runs, all-accepted rounds and cuts at EOS / budget happen.
"""

import random
from collections import Counter

import pytest
import torch

from kangaroo_lit.decoding import RoundInfo, SelfSpeculativeDecoder, VanillaDecoder
from tests.conftest import ARCHITECTURES, build_decoding_model, greedy_reference
from tests.helpers import noisy_oracle

MODES = ["off", "draft", "shared"]  # LoRA off, lora_scope "draft", lora_scope "shared"
SETTINGS = [(t, m) for t in (0.0, 0.6, 1.0) for m in (1, 6)]  # (threshold, max_draft)


pytestmark = pytest.mark.usefixtures("one_thread")

DRAFT_VOCAB = 64  # K of the restricted draft head (draft.vocab_size) in the "k64" runs


def build_restricted_model(model_dir, exit_layer: int, mode: str, seed: int, k: int = DRAFT_VOCAB):
    """As ``build_decoding_model`` (float64, perturbed), with an exit head over ``k`` random token ids."""
    from kangaroo_lit.architectures import load_base_model
    from kangaroo_lit.model import KangarooModel
    from kangaroo_lit.settings import LoraSettings

    base = load_base_model(str(model_dir), "float64")
    base.generation_config.eos_token_id = None
    base.generation_config.pad_token_id = 0
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(base.config.vocab_size, generator=gen)[:k]
    lora = None if mode == "off" else LoraSettings(rank=4, alpha=8.0, dropout=0.0, scope=mode)
    model = KangarooModel(base, exit_layer=exit_layer, lora=lora, trainable_dtype=torch.float64, draft_vocab=ids)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.05)
        o_proj = model.adapter.self_attn.o_proj.weight
        o_proj.copy_(torch.randn(o_proj.shape, generator=gen, dtype=o_proj.dtype) * 0.02)
    return model.eval()


def random_prompt(rng: random.Random, vocab: int) -> torch.Tensor:
    return torch.tensor([[rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))]])


def check_statistics(result, rounds: list[RoundInfo]) -> None:
    assert sum(result.accept_lengths) == len(result.tokens)
    assert len(result.accept_lengths) == result.full_passes == len(rounds)
    assert result.accept_lengths[0] == 1
    assert 0 <= result.accepted <= result.drafted == result.draft_steps
    assert result.drafted == sum(len(r.drafted) for r in rounds)
    assert [len(r.emitted) for r in rounds] == result.accept_lengths
    assert [t for r in rounds for t in r.emitted] == result.tokens
    assert result.wall_time_s > 0 and 0 <= result.accept_rate <= 1


@pytest.mark.parametrize("head", ["full", f"k{DRAFT_VOCAB}"])
@pytest.mark.parametrize("arch_index", range(len(ARCHITECTURES)), ids=ARCHITECTURES)
def test_greedy_equals_generate(arch_index, head, tiny_model_dirs):
    """``k64``: a restricted draft head (K = 64 ids of 320); fewer prompts, the same exactness."""
    arch = ARCHITECTURES[arch_index]
    restricted = head != "full"
    rng = random.Random(1000 + arch_index + 100 * restricted)
    events: Counter = Counter()
    prompts = 0
    # Three models per architecture; over the four, every (exit layer, LoRA mode) pair is covered.
    for m, mode in enumerate(MODES):
        exit_layer = (arch_index + m) % 3
        build = build_restricted_model if restricted else build_decoding_model
        model = build(tiny_model_dirs[arch], exit_layer, mode, seed=arch_index * 10 + m)
        vocab = model.config.vocab_size
        draft_set = set(model.draft_vocab.tolist()) if restricted else None
        for case in range(6 if restricted else 18):
            ids = random_prompt(rng, vocab)
            oracle = case % 3 != 0
            # Untrained drafts on a random model are nearly always rejected: rounds are costly, keep them short.
            max_new = rng.randint(6, 16) if oracle else rng.randint(4, 9)
            reference = greedy_reference(model, ids, max_new)
            threshold, max_draft = SETTINGS[(case + m) % len(SETTINGS)]
            eos = None
            expected = reference
            if case % 3 == 1:
                # An EOS the greedy continuation really produces, so generation stops early.
                eos = reference[rng.randint(1, max_new - 2)]
                expected = reference[: reference.index(eos) + 1]
                events["eos_stop"] += len(expected) < max_new
                if case == 1:  # HF generate agrees on where it stops
                    assert greedy_reference(model, ids, max_new, eos=eos) == expected
                if case % 2:
                    eos = [eos, vocab + 5]  # a list of stop ids works too
            eos_ids = eos if isinstance(eos, list) else [eos]
            rounds: list[RoundInfo] = []
            decoder = SelfSpeculativeDecoder(
                model,
                threshold=threshold,
                max_draft=max_draft,
                draft_logits_fn=noisy_oracle(reference, ids.shape[1], seed=case) if oracle else None,
                on_round=rounds.append,
            )
            result = decoder.generate(ids, max_new, eos_token_id=eos)
            assert result.tokens == expected, (arch, exit_layer, mode, threshold, max_draft, oracle, eos)
            check_statistics(result, rounds)
            if restricted and not oracle:  # drafts come from the restricted head's K ids only
                assert {t for info in rounds for t in info.drafted} <= draft_set
            for info in rounds[1:]:
                events["all_accepted"] += info.accepted == len(info.drafted)
                # A pass whose tokens were cut: at an EOS among accepted drafts, or at the budget.
                if len(info.emitted) < info.accepted + 1:
                    events["eos_cut" if eos is not None and info.emitted[-1] in eos_ids else "budget_cut"] += 1
                assert len(info.drafted) <= max_draft
                assert threshold < 1 or len(info.drafted) == 1
            prompts += 1
    assert prompts >= (18 if restricted else 50)
    assert all(events[e] > 0 for e in ("eos_stop", "all_accepted", "eos_cut", "budget_cut")), events


@pytest.mark.parametrize(("mode", "arch"), [("off", "llama"), ("draft", "qwen3"), ("shared", "mistral")])
def test_oracle_rounds_and_cache_lengths(mode, arch, tiny_model_dirs):
    """Drafts agree with the greedy continuation for exactly j tokens per round; check every cache after each."""
    max_draft = 4
    model = build_decoding_model(tiny_model_dirs[arch], exit_layer=1, mode=mode)
    vocab = model.config.vocab_size
    ids = torch.tensor([[5, 17, 42, 99, 7, 64, 3]])
    prompt = ids.shape[1]
    max_new = 24
    reference = greedy_reference(model, ids, max_new)
    # The draft path without cache over the reference sequence: what every draft step must reproduce.
    with torch.inference_mode():
        teacher_forced = model(torch.cat([ids, torch.tensor([reference])], dim=1)).exit_logits[0]
    schedules = [[j] for j in range(max_draft + 1)] + [[0, 4, 2, 4, 4, 1, 3, 5, 0]]
    for schedule in schedules:
        rounds: list[RoundInfo] = []
        checked = []

        def oracle(logits, position, schedule=schedule, rounds=rounds, checked=checked):
            last = rounds[-1]
            draft_index = position - (last.committed_length - 1)  # 1 for the round's first draft
            j = schedule[last.index % len(schedule)]
            if draft_index <= j + 1:  # the drafts before it were right: its context is the reference's
                torch.testing.assert_close(logits[0], teacher_forced[position - 1], rtol=1e-9, atol=1e-9)
                checked.append(position)
            target = reference[position - prompt]
            forced = target if draft_index <= j else (target + 1) % vocab
            out = torch.full_like(logits, -30.0)
            out[:, forced] = 30.0  # confident: rounds always draft max_draft (budget permitting)
            return out

        decoder = SelfSpeculativeDecoder(
            model, threshold=0.6, max_draft=max_draft, draft_logits_fn=oracle, on_round=rounds.append
        )
        result = decoder.generate(ids, max_new)
        assert result.tokens == reference
        assert len(checked) >= len(rounds) - 1
        check_statistics(result, rounds)
        first = rounds[0]
        assert first.committed_length == prompt + 1
        assert all(v == [prompt] * len(v) for v in first.cache_lengths.values())
        assert set(first.cache_lengths) == (
            {"draft_shallow", "verify_shallow", "deep", "adapter"}
            if mode == "draft"
            else {"draft_shallow", "deep", "adapter"}
        )
        for before, info in zip(rounds, rounds[1:]):
            generated = before.committed_length - prompt
            k = len(info.drafted)
            assert k == max(1, min(max_draft, max_new - generated - 1))
            j = schedule[before.index % len(schedule)]
            assert info.accepted == min(j, k)
            all_accepted = info.accepted == k
            assert info.committed_length == before.committed_length + info.accepted + 1
            committed = info.committed_length - 1  # every cache holds all committed tokens but the last
            assert info.pending == {
                "draft_shallow": int(all_accepted and mode == "draft"),
                "adapter": int(all_accepted),
            }
            assert info.cache_lengths["deep"] == [committed] * 2
            if mode == "draft":
                assert info.cache_lengths["verify_shallow"] == [committed] * 2
            assert info.cache_lengths["draft_shallow"] == [committed - info.pending["draft_shallow"]] * 2
            assert info.cache_lengths["adapter"] == [committed - info.pending["adapter"]]
        if schedule[0] >= max_draft and len(schedule) == 1:
            assert all(info.accepted == len(info.drafted) for info in rounds[1:])


@pytest.mark.parametrize("mode", MODES)
def test_each_layer_runs_once_per_token(mode, tiny_model_dirs):
    """Forward hooks count the tokens every decoder layer and the adapter process."""
    exit_layer = 1
    model = build_decoding_model(tiny_model_dirs["llama"], exit_layer=exit_layer, mode=mode, seed=3)
    ids = torch.tensor([[9, 8, 7, 6, 5, 4, 3, 200, 100]])
    prompt = ids.shape[1]
    reference = greedy_reference(model, ids, 40)
    calls: dict[str, list[list[int]]] = {f"layer{i}": [] for i in range(model.num_layers)}
    calls["adapter"] = []

    def record(name):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            positions = kwargs.get("position_ids")
            calls[name].append(positions[0].tolist() if positions is not None else [-1] * hidden.shape[1])

        return hook

    handles = [
        layer.register_forward_pre_hook(record(f"layer{i}"), with_kwargs=True) for i, layer in enumerate(model.layers)
    ]
    handles.append(model.adapter.register_forward_pre_hook(record("adapter"), with_kwargs=True))
    rounds: list[RoundInfo] = []
    decoder = SelfSpeculativeDecoder(
        model,
        threshold=0.6,
        max_draft=5,
        draft_logits_fn=noisy_oracle(reference, prompt, seed=1),
        on_round=rounds.append,
    )
    try:
        result = decoder.generate(ids, 40)
    finally:
        for handle in handles:
            handle.remove()
    assert result.tokens == reference

    n_rounds, drafted, accepted = result.full_passes - 1, result.drafted, result.accepted
    # All-accepted rounds followed by another round: the adapter (and the LoRA shallow layers of scope
    # "draft") take the pending last draft together with the next round's first draft step.
    merged = sum(info.accepted == len(info.drafted) for info in rounds[1:-1])
    assert n_rounds > 0 and merged > 0 and drafted > accepted > 0

    def tokens(name):
        return sum(len(c) for c in calls[name])

    for i in range(exit_layer + 1, model.num_layers):  # deep layers: one call per full-model pass
        assert len(calls[f"layer{i}"]) == result.full_passes
        assert tokens(f"layer{i}") == prompt + drafted + n_rounds
    for i in range(exit_layer + 1):
        if mode == "draft":
            # Verifier (no LoRA): prompt + [x, d1..dk] per round; draft path: prompt + one step per draft
            # + the merged pending drafts.
            assert len(calls[f"layer{i}"]) == 2 + drafted + n_rounds
            assert tokens(f"layer{i}") == 2 * prompt + (drafted + n_rounds) + (drafted + merged)
        else:
            # Shared shallow pass: x, d1..d(k-1) while drafting, dk once more; nothing recomputed.
            assert len(calls[f"layer{i}"]) == 1 + drafted + n_rounds
            assert tokens(f"layer{i}") == prompt + drafted + n_rounds
            seen = Counter(p for c in calls[f"layer{i}"] for p in c)
            assert set(range(prompt + len(result.tokens) - 1)) <= set(seen)
            # A position is processed again only after its draft was rejected.
            assert sum(n - 1 for n in seen.values()) <= drafted - accepted
    assert len(calls["adapter"]) == 1 + drafted
    assert tokens("adapter") == prompt + drafted + merged


@pytest.mark.parametrize("arch_index", range(len(ARCHITECTURES)), ids=ARCHITECTURES)
def test_vanilla_equals_generate(arch_index, tiny_model_dirs):
    arch = ARCHITECTURES[arch_index]
    model = build_decoding_model(tiny_model_dirs[arch], exit_layer=arch_index % 3, mode=MODES[arch_index % 3], seed=5)
    rng = random.Random(arch_index)
    for case in range(3):
        ids = random_prompt(rng, model.config.vocab_size)
        reference = greedy_reference(model, ids, 12)
        eos = reference[5] if case == 1 else None
        expected = reference[: reference.index(eos) + 1] if eos is not None else reference
        result = VanillaDecoder(model).generate(ids, 12, eos_token_id=eos)
        assert result.tokens == expected
        assert result.accept_lengths == [1] * len(expected) and result.full_passes == len(expected)
        assert result.drafted == result.accepted == result.draft_steps == 0
        assert result.mat == 1.0 and result.wall_time_s > 0


def test_input_errors(tiny_model_dirs):
    model = build_decoding_model(tiny_model_dirs["llama"], exit_layer=1, mode="off")
    for decoder in (SelfSpeculativeDecoder(model), VanillaDecoder(model)):
        with pytest.raises(ValueError, match="batch size 1"):
            decoder.generate(torch.ones(2, 4, dtype=torch.long), 4)
        limit = model.config.max_position_embeddings
        with pytest.raises(ValueError, match=rf"prompt length 10 \+ max_new_tokens {limit - 5}.*{limit}"):
            decoder.generate(torch.ones(1, 10, dtype=torch.long), limit - 5)
        with pytest.raises(ValueError, match="max_new_tokens"):
            decoder.generate(torch.ones(1, 4, dtype=torch.long), 0)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        SelfSpeculativeDecoder(model).generate(torch.ones(1, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_draft"):
        SelfSpeculativeDecoder(model, max_draft=0)


def test_prompt_at_the_position_limit(tiny_model_dirs):
    model = build_decoding_model(tiny_model_dirs["qwen2"], exit_layer=2, mode="draft")
    limit = model.config.max_position_embeddings
    ids = torch.randint(3, 200, (1, limit - 6), generator=torch.Generator().manual_seed(0))
    reference = greedy_reference(model, ids, 6)
    result = SelfSpeculativeDecoder(
        model, threshold=0.0, max_draft=6, draft_logits_fn=noisy_oracle(reference, ids.shape[1], 0)
    ).generate(ids, 6)
    assert result.tokens == reference
