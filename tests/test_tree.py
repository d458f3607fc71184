"""Tree drafting: several candidates per position, verified in one pass, output unchanged.

Greedy: token-identical to HF ``generate`` in float64 on every architecture and LoRA mode, with trees
of several shapes (width 1 = a chain, wide and shallow, narrow and deep), accepted and rejected
branches, EOS inside a branch and the token budget cut inside one; also with arbitrary random trees
that put the right token anywhere among the siblings. The caches after a tree round equal those built
by running the accepted tokens directly. Sampling: the first tokens follow the full model exactly.
"""

import json
import random
from collections import Counter

import pytest
import torch

from kangaroo_lit.decoding import RoundInfo, SelfSpeculativeDecoder, make_drafter
from kangaroo_lit.decoding.cost import CPU_STREAMING, GPU, DecodeCost, default_cost, load_cost
from kangaroo_lit.decoding.drafters import Drafter, Proposal
from kangaroo_lit.decoding.kv_cache import cache_length
from kangaroo_lit.decoding.sampling import SamplingConfig
from kangaroo_lit.decoding.tree import TreeDrafter
from kangaroo_lit.errors import ConfigError
from kangaroo_lit.masks import tree_ancestry, tree_depths, tree_pass_mask
from kangaroo_lit.settings import DecodingSettings
from tests.conftest import ARCHITECTURES, build_decoding_model, greedy_reference
from tests.helpers import (
    SAMPLING_TV_BOUND,
    build_small_model,
    exact_distribution,
    noisy_oracle,
    repeating_prompt,
    total_variation,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Verification as cheap as a step for any size (a flat v_k) and free drafting: every tree is grown and
# verified to its caps, so the shapes below are the shapes tested.
FLAT = DecodeCost(draft_step=0.0, verify={1: 1.0, 64: 1.0}, source="test: flat")

# (width, max_nodes, max_depth): a chain, wide and shallow, narrow and deep, and a larger one.
SHAPES = [(1, 4, 4), (4, 7, 2), (2, 7, 6), (3, 12, 4)]


class RandomTreeDrafter(Drafter):
    """Random trees (random shape, random tokens) with the reference's next tokens hidden in them at a
    random sibling rank: accepted paths that are not a prefix of the node order, and rejected branches.
    Never runs the draft path."""

    uses_draft_path = False

    def __init__(self, reference: list[int], prompt_length: int, vocab: int, seed: int, max_nodes: int = 8):
        self.reference, self.prompt_length, self.vocab = reference, prompt_length, vocab
        self.rng = random.Random(seed)
        self.max_nodes = max_nodes

    def propose(self, model, state, budget, sampling, generator) -> Proposal:
        n = state.committed.shape[1]
        k = self.rng.randint(0, self.max_nodes)
        parents: list[int] = []
        tokens: list[int] = []
        depth: list[int] = []
        for _ in range(k):
            parent = self.rng.randint(-1, len(tokens) - 1)
            d = 1 if parent < 0 else depth[parent] + 1
            if d > budget:
                parent, d = -1, 1
            siblings = {tokens[j] for j in range(len(tokens)) if parents[j] == parent}
            index = n - self.prompt_length + d - 1  # the reference token at this node's position
            on_path = index < len(self.reference) and self.rng.random() < 0.6
            token = self.reference[index] if on_path else self.rng.randrange(self.vocab)
            if token in siblings:
                continue
            parents.append(parent)
            tokens.append(token)
            depth.append(d)
        return Proposal(tokens=torch.tensor([tokens], dtype=state.committed.dtype), probs=None,
                        source="random_tree", parents=parents)


class FixedTree(Drafter):
    """Proposes the same tree every round."""

    def __init__(self, tokens: list[int], parents: list[int], uses_draft_path: bool):
        self.tokens, self.parents, self.uses_draft_path = tokens, parents, uses_draft_path

    def propose(self, model, state, budget, sampling, generator) -> Proposal:
        return Proposal(tokens=torch.tensor([self.tokens]), probs=None, source="fixed", parents=self.parents)


def check_round_bookkeeping(rounds: list[RoundInfo], result) -> None:
    assert len(rounds) == result.full_passes
    committed = rounds[-1].committed_length - 1
    assert rounds[-1].cache_lengths["deep"] == [committed] * len(rounds[-1].cache_lengths["deep"])
    assert sum(result.accept_lengths) == len(result.tokens)


# ---------------------------------------------------------------------------------------------------
# Masks and cost model


def test_tree_mask_lets_each_node_see_the_context_the_root_and_its_ancestors():
    parents = [-1, -1, 0, 2, 1]  # x -> {0, 1}; 0 -> 2 -> 3; 1 -> 4
    assert tree_depths(parents) == [1, 1, 2, 3, 2]
    ancestry = tree_ancestry(parents)
    assert ancestry[3].nonzero().flatten().tolist() == [0, 2, 3]
    assert ancestry[4].nonzero().flatten().tolist() == [1, 4]
    mask = tree_pass_mask(parents, root_position=5)
    assert mask.allowed.shape == (6, 11)  # x and 5 nodes over 5 context keys, x and 5 nodes
    assert mask.allowed[:, :6].all()  # the context and x
    assert mask.allowed[4, 6:].tolist() == [True, False, True, True, False]  # node 3: 0, 2, itself
    assert mask.query_positions.tolist() == [5, 6, 6, 7, 8, 7]
    cached_root = tree_pass_mask(parents, root_position=5, first=1)
    assert torch.equal(cached_root.allowed, mask.allowed[1:])
    window = mask.additive(torch.float64, sliding_window=2)
    assert window[0, 0, 4, 6] < 0 and window[0, 0, 4, 8] == 0  # node 3 at 8: 0 (pos 6) is out of a window of 2
    with pytest.raises(ValueError, match="parent 2"):
        tree_depths([-1, 2])


def test_cost_model_interpolates_and_reads_bench_reports(tmp_path):
    cost = DecodeCost(draft_step=0.1, verify={2: 1.1, 4: 1.3})
    assert cost.verify_cost(1) == 1.0 and cost.verify_cost(3) == pytest.approx(1.2)
    assert cost.verify_cost(6) == pytest.approx(1.5)  # beyond the table: the last slope
    report = tmp_path / "decode_cost_model_cpu.json"
    report.write_text(json.dumps({"layers": [{"exit_layer": 2, "c": 0.2, "v": {"2": 1.05, "8": 1.4}}]}))
    read = DecodeCost.from_report(report, exit_layer=2)
    assert read.draft_step == 0.2 and read.verify_cost(8) == 1.4 and read.source == str(report)
    with pytest.raises(ConfigError, match=r"exit layers \[2\], not the draft's 1"):
        DecodeCost.from_report(report, exit_layer=1)
    (tmp_path / "other.json").write_text("[]")
    with pytest.raises(ConfigError, match="bench cost_model"):
        DecodeCost.from_report(tmp_path / "other.json", exit_layer=2)
    assert default_cost("cuda") is GPU and default_cost("cpu", "streaming") is CPU_STREAMING
    assert load_cost("builtin:gpu", exit_layer=1) is GPU and load_cost(str(report), exit_layer=2) == read
    with pytest.raises(ConfigError, match="builtin:cpu_streaming"):
        load_cost("builtin:tpu", exit_layer=1)


def test_settings_check_tree_options():
    with pytest.raises(ConfigError, match="--tree_nodes 8"):
        DecodingSettings.for_options(drafter="tree", kernel="streaming", tree_nodes=8)
    with pytest.raises(ConfigError, match="--tree_width must be >= 1"):
        DecodingSettings.for_options(drafter="tree", tree_width=0)
    settings = DecodingSettings.for_options(drafter="tree", tree_width=2, tree_nodes=5, tree_depth=3)
    drafter = settings.make_drafter()
    assert isinstance(drafter, TreeDrafter) and (drafter.width, drafter.max_nodes, drafter.max_depth) == (2, 5, 3)
    assert drafter.cost is default_cost("cpu", "eager")
    with_lookup = DecodingSettings.for_options(drafter="tree", prompt_lookup=3).make_drafter()
    assert isinstance(with_lookup.adapter, TreeDrafter)


# ---------------------------------------------------------------------------------------------------
# Greedy: identical to HF generate


@pytest.mark.parametrize("arch_index", range(len(ARCHITECTURES)), ids=ARCHITECTURES)
def test_tree_drafter_is_greedy_identical(arch_index, tiny_model_dirs):
    arch = ARCHITECTURES[arch_index]
    rng = random.Random(700 + arch_index)
    seen: Counter = Counter()
    for m, mode in enumerate(("off", "draft", "shared")):
        attn = "eager" if m == 1 else "sdpa"
        model = build_decoding_model(tiny_model_dirs[arch], (arch_index + m) % 3, mode, seed=arch_index * 3 + m,
                                     attn_implementation=attn)
        for case, (width, nodes, depth) in enumerate(SHAPES):
            ids = repeating_prompt(rng, model.config.vocab_size, (1, 3))
            max_new = rng.randint(9, 18)
            reference = greedy_reference(model, ids, max_new)
            hook = noisy_oracle(reference, ids.shape[1], seed=case, p_agree=0.5)
            drafter = TreeDrafter(FLAT, width, nodes, depth, draft_logits_fn=hook)
            rounds: list[RoundInfo] = []
            result = SelfSpeculativeDecoder(model, drafter=drafter, on_round=rounds.append).generate(ids, max_new)
            assert result.tokens == reference, (arch, mode, case)
            check_round_bookkeeping(rounds, result)
            for info in rounds[1:]:
                assert 0 < len(info.drafted) <= nodes
                seen["accepted_past_first_child"] += info.accepted > 0 and len(info.drafted) > info.accepted
                seen["rejected"] += info.accepted == 0
                seen["wide"] += width > 1 and len(info.drafted) > depth
    assert seen["accepted_past_first_child"] and seen["rejected"] and seen["wide"], seen


@pytest.mark.parametrize("arch_index", range(len(ARCHITECTURES)), ids=ARCHITECTURES)
def test_random_trees_are_greedy_identical_with_eos_and_budget_inside_branches(arch_index, tiny_model_dirs):
    arch = ARCHITECTURES[arch_index]
    rng = random.Random(800 + arch_index)
    seen: Counter = Counter()
    for m, mode in enumerate(("off", "draft", "shared")):
        model = build_decoding_model(tiny_model_dirs[arch], (arch_index + m + 1) % 3, mode, seed=arch_index + 10 * m)
        for case in range(4):
            ids = repeating_prompt(rng, model.config.vocab_size, (1, 3))
            max_new = (1, 2, rng.randint(6, 10), rng.randint(12, 20))[case]
            reference = greedy_reference(model, ids, max_new)
            eos = None
            if case == 3:  # EOS: a token of the reference, so generation stops inside an accepted branch
                eos = reference[rng.randint(3, max_new - 2)]
                reference = greedy_reference(model, ids, max_new, eos=eos)
            for drafter in (RandomTreeDrafter(reference, ids.shape[1], model.config.vocab_size, seed=case),
                            make_drafter("tree", tree_width=3, tree_nodes=6, tree_depth=4, prompt_lookup=2,
                                         prompt_lookup_ngram=(1, 2), cost=FLAT)):
                rounds: list[RoundInfo] = []
                result = SelfSpeculativeDecoder(model, drafter=drafter, on_round=rounds.append).generate(
                    ids, max_new, eos_token_id=eos)
                assert result.tokens == reference, (arch, mode, case, type(drafter).__name__)
                check_round_bookkeeping(rounds, result)
                for info in rounds[1:]:
                    if info.parents is None:
                        continue
                    assert len(info.path) == info.accepted
                    assert all(info.parents[b] == a for a, b in zip([-1, *info.path], info.path))  # a path
                    seen["off_prefix"] += info.path != list(range(info.accepted))
                seen["budget_cut"] += len(result.tokens) < rounds[-1].committed_length - ids.shape[1]
                seen["eos_in_branch"] += eos is not None and rounds[-1].accepted > len(rounds[-1].emitted) - 1
    assert seen["off_prefix"] and seen["budget_cut"] and seen["eos_in_branch"], seen


def test_caches_after_a_tree_round_equal_the_accepted_tokens_run_directly(tiny_model_dirs):
    """A tree whose accepted path skips nodes (second child, then a grandchild): every cache segment of
    the verifier holds, to 1e-9, what a plain pass over the committed tokens writes."""
    from transformers import DynamicCache

    for arch in ARCHITECTURES:
        for mode in ("off", "draft", "shared"):
            model = build_decoding_model(tiny_model_dirs[arch], 1, mode, seed=3)
            ids = torch.tensor([[5, 9, 13, 5, 9, 21]])
            reference = greedy_reference(model, ids, 6)
            vocab = model.config.vocab_size
            wrong = [(t + 1) % vocab for t in reference]

            # x -> {wrong, ref1}; ref1 -> {wrong, ref2}; ref2 -> {ref3}; the wrong first child -> {ref1}
            tokens = [wrong[1], reference[1], reference[1], wrong[2], reference[2], reference[3]]
            fixed = FixedTree(tokens, [-1, -1, 0, 1, 1, 4], uses_draft_path=mode == "draft")
            decoder = SelfSpeculativeDecoder(model, drafter=fixed)
            result = decoder.generate(ids, 1)  # the prefill: the first token
            with torch.inference_mode():
                from kangaroo_lit.decoding.result import DecodeResult

                res = DecodeResult()
                sampling = SamplingConfig()
                state = decoder._prefill(ids, sampling, None, res, set(), 10)
                decoder._round(state, 1, sampling, None, res, set(), 10)
                assert res.tokens == reference[:5], (arch, mode)  # first token, 3 accepted, the correction
                assert result.tokens == reference[:1]
                committed = state.committed
                keep = committed.shape[1] - 1
                fresh = {"deep": DynamicCache(), "shallow": DynamicCache()}
                where = torch.arange(keep)[None]
                shallow = model.shallow(model.embed(committed[:, :keep]), where, cache=fresh["shallow"], draft=False)
                model.deep_logits(shallow, where, cache=fresh["deep"])
            own = "draft_shallow" if model.shallow_is_shared else "verify_shallow"
            for name, layers, fresh_cache in (("deep", range(2, model.num_layers), fresh["deep"]),
                                              (own, range(2), fresh["shallow"])):
                for idx in layers:
                    got, want = state.caches[name].layers[idx], fresh_cache.layers[idx]
                    assert cache_length(state.caches[name], idx) == keep
                    torch.testing.assert_close(got.keys, want.keys, atol=1e-9, rtol=0)
                    torch.testing.assert_close(got.values, want.values, atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Sampling: exact


@pytest.mark.parametrize("mode", ["off", pytest.param("draft", marks=pytest.mark.slow)])
def test_sampling_with_trees_is_exact(mode):
    """Trees of the untrained draft (and random trees): the first three tokens follow the full model."""
    prompt, first = [1, 5, 7], 3
    sampling = SamplingConfig(temperature=1.0, top_k=3)
    model = build_small_model(mode)
    exact = exact_distribution(model, prompt, sampling, first)
    rounds: Counter = Counter()

    def note(info: RoundInfo) -> None:
        if info.index:
            rounds["accepted"] += info.accepted
            rounds["rejected_branch"] += len(info.drafted) > info.accepted

    decoder = SelfSpeculativeDecoder(model, drafter=TreeDrafter(FLAT, width=2, max_nodes=4, max_depth=2),
                                     on_round=note)
    generator = torch.Generator().manual_seed(7)
    counts: Counter = Counter()
    for _ in range(2500):
        result = decoder.generate(torch.tensor([prompt]), first + 1, temperature=1.0, top_k=3, generator=generator)
        counts[tuple(result.tokens[:first])] += 1
    assert rounds["accepted"] > 0 and rounds["rejected_branch"] > 0, rounds
    assert total_variation(counts, exact) < SAMPLING_TV_BOUND


def test_the_cost_model_sizes_the_tree():
    """Expensive verification (one CPU core) grows smaller trees than a flat v_k (a GPU); a draft step
    that costs more than any expected gain gives plain steps."""
    model = build_small_model("off")
    prompt = torch.tensor([[1, 5, 7, 2]])
    sizes = {}
    for name, cost in (("flat", FLAT), ("cpu", CPU_STREAMING), ("steep", DecodeCost(0.0, {2: 3.0, 8: 9.0}))):
        rounds: list[RoundInfo] = []
        decoder = SelfSpeculativeDecoder(model, drafter=TreeDrafter(cost, width=3, max_nodes=7, max_depth=3),
                                         on_round=rounds.append)
        decoder.generate(prompt, 12)
        sizes[name] = sum(len(r.drafted) for r in rounds[1:]) / (len(rounds) - 1)
    assert sizes["flat"] > sizes["cpu"] > sizes["steep"] == 0, sizes


@pytest.mark.parametrize("mode", ["off", "draft", "shared"])
def test_a_width_one_tree_drafts_what_the_chain_drafts(mode, tiny_model_dirs):
    """The expansion passes (tree mask, positions, rolled-back draft caches) give the draft path's own
    logits: a tree of width 1 proposes the chain's tokens, round after round."""
    model = build_decoding_model(tiny_model_dirs["qwen3"], 1, mode, seed=11)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42, 4, 8]])
    chains, trees = [], []
    for drafter, out in ((make_drafter("adapter", threshold=0.0, max_draft=4), chains),
                         (TreeDrafter(FLAT, width=1, max_nodes=4, max_depth=4), trees)):
        SelfSpeculativeDecoder(model, drafter=drafter, on_round=lambda r, out=out: out.append(r.drafted)).generate(
            ids, 16)
    assert trees == chains and len(trees) > 2


def test_the_benchmarks_synthetic_draft_is_calibrated_with_the_profile_asked_for():
    """bench tree_vs_chain's draft: the true token is within its top k as often as the profile says, and
    the probability it gives its rank-r token is that rank's share (so confidence means acceptance)."""
    from kangaroo_lit.bench.tree_vs_chain import SMOLLM2_PROFILE, synthetic_draft

    vocab, n = 500, 3000
    reference = [random.Random(i).randrange(vocab) for i in range(n)]
    hook = synthetic_draft(reference, prompt_length=10, vocab=vocab, profile=SMOLLM2_PROFILE, seed=1)
    within = Counter()
    for position in range(10, 10 + n):
        logits = hook(torch.zeros(1, vocab), position)
        order = logits[0].argsort(descending=True).tolist()
        rank = order.index(reference[position - 10])
        for k in range(len(SMOLLM2_PROFILE)):
            within[k] += rank <= k
    probs = logits[0].softmax(-1).sort(descending=True).values
    assert probs[0] == pytest.approx(SMOLLM2_PROFILE[0])
    assert probs[1] == pytest.approx(SMOLLM2_PROFILE[1] - SMOLLM2_PROFILE[0])
    for k, p in enumerate(SMOLLM2_PROFILE):
        assert within[k] / n == pytest.approx(p, abs=0.03), k
    assert torch.equal(hook(torch.zeros(1, vocab), 50), hook(torch.zeros(1, vocab), 50))  # chain and tree alike


@pytest.mark.parametrize("mode", ["off", "draft", "shared"])
def test_threshold_curve_replays_chain_decoding_exactly(mode, tiny_model_dirs):
    """bench threshold_curve's replay of chain rounds over the model's own greedy answer gives the decoder's
    rounds, accepted drafts and tokens (and, at threshold 0, its drafts) for every setting."""
    from types import SimpleNamespace

    from kangaroo_lit.bench.threshold_curve import force_answers, replay_chain

    model = build_decoding_model(tiny_model_dirs["llama"], 1, mode, seed=21)
    model.confidence_temperature = 1.7
    ids = torch.tensor([[4, 9, 12, 4, 9, 30, 7]])
    max_new = 40
    reference = greedy_reference(model, ids, max_new)
    forced = force_answers(model, [SimpleNamespace(ids=ids[0].tolist() + reference, n_prompt=ids.shape[1])])
    seen = set()
    for threshold, max_draft, skip in ((0.0, 3, 0.0), (0.0, 6, 0.0), (0.05, 4, 0.0), (0.2, 6, 0.0), (0.0, 2, 0.1)):
        drafter = make_drafter("adapter", threshold, max_draft, skip_below=skip)
        result = SelfSpeculativeDecoder(model, drafter=drafter).generate(ids, max_new)
        replay = replay_chain(forced, threshold, max_draft, skip, CPU_STREAMING)
        assert result.tokens == reference
        assert replay.tokens == len(result.tokens) - 1
        assert (replay.rounds, replay.accepted) == (result.full_passes - 1, result.accepted), (threshold, max_draft)
        if threshold == 0:
            assert (replay.drafted, replay.draft_steps) == (result.drafted, result.draft_steps)
        seen.add(result.accepted > 0)
    assert True in seen


def test_recorded_sizing_overrides_the_training_runs_decoding_defaults(tmp_path):
    """bench threshold_curve --record writes the cost model's best chain sizing into kangaroo.json; loaders
    default to it over what training recorded (other fields stay the training run's)."""
    from kangaroo_lit.artifact import MANIFEST
    from kangaroo_lit.bench.threshold_curve import record_sizing
    from kangaroo_lit.decoding.session import recorded_decoding

    manifest = {"training": {"model": {"decoding": {"threshold": 0.4, "max_draft": 6, "max_new_tokens": 99}}}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert recorded_decoding(manifest).threshold == 0.4
    record_sizing(str(tmp_path), {"threshold": 0.7, "max_draft": 3, "skip_below": 0.0, "predicted_speedup": 1.1})
    written = json.loads((tmp_path / MANIFEST).read_text())
    settings = recorded_decoding(written)
    assert (settings.threshold, settings.max_draft, settings.max_new_tokens) == (0.7, 3, 99)
    assert not (tmp_path / (MANIFEST + ".partial")).exists()
    with pytest.raises(ConfigError, match="decoding.threshold"):
        recorded_decoding({**written, "sizing": {"threshold": 2.0}})
