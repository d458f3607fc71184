"""KangarooModel on every supported architecture: the two paths, LoRA scopes, validation."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kangaroo_lit.architectures import check_exit_layer, load_base_model
from kangaroo_lit.masks import causal_attention_mask
from kangaroo_lit.model import KangarooModel
from kangaroo_lit.settings import LoraSettings
from tests.conftest import ARCHITECTURES

pytestmark = pytest.mark.usefixtures("one_thread")


def build(model_dir, exit_layer=1, lora=None, exit_head="shared", attn_implementation="sdpa"):
    base = load_base_model(str(model_dir), "float64", attn_implementation)
    return KangarooModel(base, exit_layer, lora=lora, exit_head=exit_head, trainable_dtype=torch.float64).eval()


def perturb_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_paths_on_each_architecture(tiny_model_dirs, arch):
    """Full path == untouched base; untrained draft path == plain early exit (norm + lm_head)."""
    reference = load_base_model(str(tiny_model_dirs[arch]), "float64")
    ids = torch.randint(3, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    expected_full = reference(ids).logits
    hidden = reference(ids, output_hidden_states=True).hidden_states
    for exit_layer in (0, 2):
        model = build(tiny_model_dirs[arch], exit_layer, LoraSettings(rank=4, scope="draft"))
        perturb_lora(model)
        out = model(ids)
        torch.testing.assert_close(out.main_logits, expected_full, rtol=0, atol=1e-10)
        plain = build(tiny_model_dirs[arch], exit_layer)
        early_exit = reference.lm_head(reference.model.norm(hidden[exit_layer + 1]))
        torch.testing.assert_close(plain(ids).exit_logits, early_exit, rtol=0, atol=1e-10)
        # LoRA on the draft path changes the draft, not the verifier.
        assert (out.exit_logits - early_exit).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_right_padding_leaves_real_positions_unchanged(tiny_model_dirs, arch, backend):
    """A right-padded row's logits at its real positions equal those of the row alone, on both paths."""
    model = build(
        tiny_model_dirs[arch], 1, LoraSettings(rank=4, dropout=0.0, scope="draft"), attn_implementation=backend
    )
    perturb_lora(model)
    o_proj = model.adapter.self_attn.o_proj.weight
    with torch.no_grad():  # an adapter whose attention matters
        o_proj.copy_(torch.randn(o_proj.shape, generator=torch.Generator().manual_seed(1), dtype=o_proj.dtype) * 0.1)
    lengths = torch.tensor([12, 7, 1])
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    ids = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(2)).masked_fill(mask == 0, 2)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        as_bool = model(ids, attention_mask=mask.bool())
        torch.testing.assert_close(as_bool.main_logits, out.main_logits, rtol=0, atol=0)
        # HF's eager attention takes its softmax in float32 even in a float64 model: rows of other
        # lengths round differently there (~1e-6); SDPA stays in float64.
        tol = {"rtol": 0.0, "atol": 1e-10 if backend == "sdpa" else 1e-5}
        for row, n in enumerate(lengths.tolist()):
            alone = model(ids[row : row + 1, :n])
            torch.testing.assert_close(out.main_logits[row, :n], alone.main_logits[0], **tol)
            torch.testing.assert_close(out.exit_logits[row, :n], alone.exit_logits[0], **tol)


def test_padding_must_be_on_the_right(tiny_llama_dir):
    model = build(tiny_llama_dir, 1)
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="padding must be on the right"):
        model(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="padding must be on the right"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"shape \(2, 5\), input_ids \(2, 6\)"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    model(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]))  # right padding is fine


def test_shared_scope_full_path_is_the_merged_model(tiny_llama_dir):
    model = build(tiny_llama_dir, 1, LoraSettings(rank=4, scope="shared", dropout=0.0))
    perturb_lora(model)
    ids = torch.randint(3, 300, (1, 11), generator=torch.Generator().manual_seed(1))
    out = model(ids)
    merged = model.base.merge_and_unload()
    torch.testing.assert_close(out.main_logits, merged(ids).logits, rtol=0, atol=1e-10)


def test_lora_only_on_shallow_layers_and_trainable_set(tiny_llama_dir):
    model = build(tiny_llama_dir, 1, LoraSettings(rank=4, target_modules=["q_proj", "v_proj"]), exit_head="trainable")
    names = [n for n, _ in model.trainable_parameters()]
    lora_layers = {int(n.split(".layers.")[1].split(".")[0]) for n in names if "lora_" in n}
    assert lora_layers == {0, 1}
    assert all(("q_proj" in n or "v_proj" in n) for n in names if "lora_" in n)
    assert any(n.startswith("adapter.") for n in names) and any(n.startswith("exit_proj.") for n in names)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert not any(n.startswith(("adapter.", "exit_proj.")) or "lora_" in n for n in frozen)


def test_adapter_follows_base_attention_config(tiny_model_dirs):
    model = build(tiny_model_dirs["qwen3"], 1)
    attn = model.adapter.self_attn
    assert type(attn) is type(model.layers[0].self_attn)
    assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")  # Qwen3's per-head norms
    n_params = sum(p.numel() for p in model.adapter.parameters())
    d = model.config.hidden_size
    assert n_params < 4 * d * d + 10 * d  # ~4 d^2 with GQA a bit less, no MLP


@pytest.mark.parametrize("exit_layer", [-1, 3, 10])
def test_exit_layer_out_of_range(tiny_llama_dir, exit_layer):
    base = load_base_model(str(tiny_llama_dir), "float32")
    with pytest.raises(ValueError, match=r"exit_layer=.* out of range .* 4 decoder layers: allowed 0\.\.2"):
        KangarooModel(base, exit_layer)


def test_exit_layer_type():
    with pytest.raises(TypeError):
        check_exit_layer(1.0, 4)


def test_unsupported_architecture_is_refused(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*supported: llama, mistral, qwen2, qwen3"):
        load_base_model(str(tmp_path))


def test_causal_mask_with_past_padding_and_window():
    mask = causal_attention_mask(2, 3, torch.float32, torch.device("cpu"),
                                 padding_mask=torch.tensor([[0, 1, 1, 1, 1]]), sliding_window=3)
    allowed = (mask == 0)[0, 0].int().tolist()
    # queries at positions 3 and 4; key 0 is padding; window 3 keeps keys q-2..q
    assert allowed == [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
