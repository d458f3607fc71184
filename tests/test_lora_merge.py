"""Folding LoRA into plain layers for decoding (``KangarooModel.merge_lora_for_decoding``).

What must hold: the verifier computes exactly what it computed before (scope "draft": the untouched
base, bit for bit), the draft path what it computed before up to rounding, greedy decoding stays
token-identical to HF ``generate`` of the verifying model (float64, every architecture, both scopes),
a loaded HF model is given back without LoRA modules, and ``load_for_decoding`` folds an artifact's LoRA.
"""

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from kangaroo_lit.decoding import SelfSpeculativeDecoder
from kangaroo_lit.settings import LoraSettings
from tests.conftest import ARCHITECTURES, build_decoding_model, greedy_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def _frozen(model):
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("arch_index", range(len(ARCHITECTURES)), ids=ARCHITECTURES)
@pytest.mark.parametrize("mode", ["draft", "shared"])
def test_merged_lora_decodes_as_before(arch_index, mode, tiny_model_dirs):
    arch = ARCHITECTURES[arch_index]
    model = _frozen(build_decoding_model(tiny_model_dirs[arch], exit_layer=1, mode=mode, seed=arch_index))
    gen = torch.Generator().manual_seed(arch_index)
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=gen)
    with torch.inference_mode():
        before = model(ids)
    reference = greedy_reference(model, ids, 16)
    unmerged = SelfSpeculativeDecoder(model, threshold=0.0, max_draft=3).generate(ids, 16)

    model.merge_lora_for_decoding()
    assert model.lora_merged and not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert (model.draft_layers is not None) == (mode == "draft")
    with torch.inference_mode():
        after = model(ids)
    if mode == "draft":
        assert torch.equal(after.main_logits, before.main_logits)  # the untouched base, bit for bit
    else:
        torch.testing.assert_close(after.main_logits, before.main_logits, rtol=0, atol=1e-9)
    torch.testing.assert_close(after.exit_logits, before.exit_logits, rtol=0, atol=1e-9)

    merged = SelfSpeculativeDecoder(model, threshold=0.0, max_draft=3).generate(ids, 16)
    assert merged.tokens == unmerged.tokens == reference
    assert merged.accept_lengths == unmerged.accept_lengths  # the draft path drafted the same tokens
    assert greedy_reference(model, ids, 16) == reference  # the verifying model is still the same model


def test_merge_gives_a_loaded_model_back_without_lora(tiny_llama_dir):
    from kangaroo_lit.architectures import load_base_model
    from kangaroo_lit.model import KangarooModel

    base = load_base_model(str(tiny_llama_dir), "float64")
    weights = {n: p.clone() for n, p in base.named_parameters()}
    model = KangarooModel(base, exit_layer=1, lora=LoraSettings(rank=4, scope="draft"), trainable_dtype=torch.float64)
    assert any(isinstance(m, BaseTunerLayer) for m in base.modules())  # PEFT injects into the given model
    _frozen(model).merge_lora_for_decoding()
    assert model.causal_lm is base
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    assert {n: p for n, p in base.named_parameters()}.keys() == weights.keys()
    assert all(torch.equal(p, weights[n]) for n, p in base.named_parameters())


def test_merge_refuses_a_trainable_model_and_is_a_no_op_without_lora(tiny_llama_dir):
    trainable = build_decoding_model(tiny_llama_dir, exit_layer=1, mode="draft")
    with pytest.raises(ValueError, match="trainable parameters"):
        trainable.merge_lora_for_decoding()
    assert not trainable.lora_merged
    plain = _frozen(build_decoding_model(tiny_llama_dir, exit_layer=1, mode="off"))
    plain.merge_lora_for_decoding()
    assert not plain.lora_merged and plain.draft_layers is None


def test_load_for_decoding_folds_an_artifacts_lora(tiny_llama_dir, tmp_path):
    from kangaroo_lit.artifact import load_artifact
    from kangaroo_lit.decoding.session import load_for_decoding
    from tests.helpers import exported_artifact

    _, _, artifact = exported_artifact(tiny_llama_dir, tmp_path, lora=LoraSettings(rank=4, scope="draft"))
    loaded = load_for_decoding(artifact).model
    assert loaded.lora_merged and loaded.draft_layers is not None
    assert not any(isinstance(m, BaseTunerLayer) for m in loaded.modules())
    unmerged = load_artifact(artifact)
    ids = torch.randint(3, unmerged.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = unmerged(ids), loaded(ids)
    assert torch.equal(a.main_logits, b.main_logits)
    torch.testing.assert_close(a.exit_logits, b.exit_logits, rtol=0, atol=1e-4)  # float32 rounding


def test_a_folded_model_is_not_exported(tiny_llama_dir, tmp_path):
    """Its LoRA weights are gone into the layers: saving would write the base as "LoRA", so it is refused."""
    from kangaroo_lit.artifact import save_artifact
    from kangaroo_lit.decoding.session import load_for_decoding
    from kangaroo_lit.errors import ConfigError
    from tests.helpers import exported_artifact

    _, _, artifact = exported_artifact(tiny_llama_dir, tmp_path, lora=LoraSettings(rank=4, scope="draft"))
    folded = load_for_decoding(artifact).model
    with pytest.raises(ConfigError, match="folded into its layers"):
        save_artifact(folded, tmp_path / "again", base_model=str(tiny_llama_dir))
    assert not (tmp_path / "again").exists()
