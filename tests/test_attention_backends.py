"""The model is causal under every attention backend, not only under SDPA's ``is_causal`` flag.

HF's ``eager`` attention has no causal flag: a None mask there means full bidirectional attention. So the
training forward, ``full_logits`` and the decoder's prefill must give ``eager`` an explicit causal mask.
Float64 tiny random models of every supported architecture (DESIGN.md §3). HF's eager attention takes
its softmax in float32 even then, so eager and SDPA agree to ~1e-6 here, not to float64 rounding; a leak
of future tokens moves logits by ~5.
"""

import random

import pytest
import torch

from kangaroo_lit.architectures import load_base_model
from kangaroo_lit.attention import ATTENTION_NAME, grouped_sdpa_attention_forward
from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder
from kangaroo_lit.model import KangarooModel
from tests.conftest import ARCHITECTURES, build_decoding_model, greedy_reference

pytestmark = pytest.mark.usefixtures("one_thread")

# Same backend: our model and HF's agree to float64 rounding.
SAME = {"rtol": 0.0, "atol": 1e-9}
# eager vs sdpa: HF's eager attention takes its softmax in float32 even for a float64 model, so the two
# backends differ by ~1e-6 at most here (a leak of future tokens moves logits by ~5).
ACROSS = {"rtol": 0.0, "atol": 1e-5}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eager_forward_is_causal(arch, tiny_model_dirs):
    """Training forward under eager: full path == HF's own eager forward, and == the SDPA result; draft too."""
    model_dir = tiny_model_dirs[arch]
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(7))
    reference = load_base_model(str(model_dir), "float64", "eager")
    with torch.no_grad():
        expected = reference(ids).logits
        first = reference(ids[:, :1]).logits
    # LoRA scope "draft", perturbed: the full path is the untouched base; the draft is not plain early exit.
    outs, full = {}, {}
    for backend in ("eager", "sdpa"):
        torch.manual_seed(0)  # LoRA A is drawn when PEFT wraps the base: the same for both backends
        model = build_decoding_model(model_dir, exit_layer=1, mode="draft", seed=3, attn_implementation=backend)
        # sdpa runs as its grouped-head variant (kangaroo_lit.attention), tested against HF's sdpa below.
        expected_backend = ATTENTION_NAME if backend == "sdpa" else backend
        assert model.config._attn_implementation == expected_backend
        assert model.adapter.config._attn_implementation == expected_backend
        with torch.no_grad():
            outs[backend] = model(ids)
            full[backend] = model.full_logits(ids)
    torch.testing.assert_close(outs["eager"].main_logits[:, :1], first, **SAME)  # sees no later token
    torch.testing.assert_close(outs["eager"].main_logits, expected, **SAME)
    torch.testing.assert_close(full["eager"], expected, **SAME)
    torch.testing.assert_close(outs["eager"].main_logits, outs["sdpa"].main_logits, **ACROSS)
    torch.testing.assert_close(full["eager"], full["sdpa"], **ACROSS)
    torch.testing.assert_close(outs["eager"].exit_logits, outs["sdpa"].exit_logits, **ACROSS)


@pytest.mark.parametrize("arch_index", range(len(ARCHITECTURES)), ids=ARCHITECTURES)
def test_eager_greedy_decoding_equals_generate(arch_index, tiny_model_dirs):
    """Self-speculative greedy decoding under eager == HF generate (eager) == the vanilla decoder."""
    arch = ARCHITECTURES[arch_index]
    rng = random.Random(500 + arch_index)
    drafted = accepted = 0
    # An untrained adapter (o_proj zero: plain early exit) and a perturbed one with LoRA of some scope.
    for mode, perturb in (("off", False), (("draft", "shared", "off", "draft")[arch_index], True)):
        torch.manual_seed(arch_index)  # LoRA A, drawn when PEFT wraps the base
        model = build_decoding_model(
            tiny_model_dirs[arch],
            exit_layer=arch_index % 3,
            mode=mode,
            seed=arch_index,
            attn_implementation="eager",
            perturb=perturb,
        )
        for threshold, max_draft in ((0.0, 3), (0.6, 4)):
            ids = torch.tensor([[rng.randrange(3, model.config.vocab_size) for _ in range(rng.randint(4, 12))]])
            expected = greedy_reference(model, ids, 8)
            assert VanillaDecoder(model).generate(ids, 8).tokens == expected
            result = SelfSpeculativeDecoder(model, threshold=threshold, max_draft=max_draft).generate(ids, 8)
            assert result.tokens == expected, (arch, mode, perturb, threshold, max_draft)
            drafted += result.drafted
            accepted += result.accepted
    assert drafted > accepted > 0, (drafted, accepted)


def test_other_backends_are_refused(tiny_llama_dir):
    """Flash attention reads a 2-D padding mask, flex attention a BlockMask: our 4-D masks would be wrong."""
    base = load_base_model(str(tiny_llama_dir), "float32", "flex_attention")
    with pytest.raises(ValueError, match=r"attn_implementation 'flex_attention' is not supported; supported: sdpa"):
        KangarooModel(base, 1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "grad"])
def test_grouped_sdpa_equals_hf_sdpa(arch, grad, tiny_model_dirs):
    """The grouped-head SDPA gives HF's sdpa output (float64) for masked passes over several queries.

    The case it changes (several queries, a mask, grouped key/value heads, no gradient: a verification
    pass) and the cases it hands to HF (one query, no mask, gradients) against HF's own function, on a real
    attention layer of each architecture with a tree-like (not causal) mask and a cache of 9 positions.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    base = load_base_model(str(tiny_model_dirs[arch]), "float64", "sdpa")
    attention = base.model.layers[0].self_attn
    assert attention.num_key_value_groups > 1  # the tiny configs are GQA: the changed path is exercised
    heads, kv_heads, dim = base.config.num_attention_heads, base.config.num_key_value_heads, attention.head_dim
    gen = torch.Generator().manual_seed(11)
    for queries, masked in ((4, True), (1, True), (4, False), (1, False)):
        query = torch.randn(1, heads, queries, dim, generator=gen, dtype=torch.float64)
        key = torch.randn(1, kv_heads, 9 + queries, dim, generator=gen, dtype=torch.float64)
        value = torch.randn(1, kv_heads, 9 + queries, dim, generator=gen, dtype=torch.float64)
        mask = None
        if masked:  # each new token sees the cache, itself and a random subset of the others
            allowed = torch.rand(queries, queries, generator=gen) < 0.5
            allowed |= torch.eye(queries, dtype=torch.bool)
            mask = torch.cat([torch.ones(queries, 9, dtype=torch.bool), allowed], dim=1)[None, None]
        with torch.set_grad_enabled(grad):
            ours, _ = grouped_sdpa_attention_forward(attention, query, key, value, mask, scaling=attention.scaling)
            theirs, _ = sdpa_attention_forward(attention, query, key, value, mask, scaling=attention.scaling)
        assert ours.shape == theirs.shape == (1, queries, heads, dim)
        torch.testing.assert_close(ours, theirs, rtol=0.0, atol=1e-12)


def test_grouped_sdpa_is_not_saved(tiny_model_dirs, tmp_path):
    """Building a KangarooModel switches its sdpa base to the grouped variant; a saved config does not say so."""
    import json

    base = load_base_model(str(tiny_model_dirs["llama"]), "float64", "sdpa")
    model = KangarooModel(base, exit_layer=1)
    assert model.config._attn_implementation == model.adapter.config._attn_implementation == ATTENTION_NAME
    base.config.save_pretrained(tmp_path)
    assert ATTENTION_NAME not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    KangarooModel(base, exit_layer=1)  # a base switched already is accepted again
