"""The adapter's optional MLP block (``draft.adapter_mlp``): an untrained one is a no-op, a trained one
travels through checkpoint, export and load, and decoding with it stays exact on every architecture."""

import pytest
import torch

from kangaroo_lit.architectures import load_base_model
from kangaroo_lit.decoding import SelfSpeculativeDecoder
from kangaroo_lit.errors import ConfigError
from kangaroo_lit.model import KangarooModel
from kangaroo_lit.settings import DraftSettings
from tests.conftest import ARCHITECTURES, greedy_reference
from tests.helpers import exported_artifact, noisy_oracle

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_untrained_mlp_changes_nothing(tiny_model_dirs):
    base = load_base_model(str(tiny_model_dirs["llama"]), "float64")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    plain = KangarooModel(base, exit_layer=1, trainable_dtype=torch.float64).eval()
    with_mlp = KangarooModel(base, exit_layer=1, trainable_dtype=torch.float64, adapter_mlp=24).eval()
    assert with_mlp.adapter.mlp.up_proj.out_features == 24
    extra = sum(p.numel() for p in with_mlp.adapter.parameters()) - sum(p.numel() for p in plain.adapter.parameters())
    d = base.config.hidden_size
    assert extra == 3 * d * 24 + d  # gate, up, down projections and the MLP's norm
    with torch.inference_mode():
        torch.testing.assert_close(with_mlp(ids).exit_logits, plain(ids).exit_logits, rtol=0, atol=1e-12)


def test_adapter_mlp_is_validated():
    with pytest.raises(ConfigError, match="draft.adapter_mlp must be >= 0"):
        DraftSettings(adapter_mlp=-1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_decoding_with_an_mlp_adapter_is_exact(arch, tiny_model_dirs):
    base = load_base_model(str(tiny_model_dirs[arch]), "float64")
    base.generation_config.eos_token_id = None
    base.generation_config.pad_token_id = 0
    model = KangarooModel(base, exit_layer=1, trainable_dtype=torch.float64, adapter_mlp=32).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking MLP: its branch now changes the drafts
        for p in model.adapter.mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 64]])
    reference = greedy_reference(model, ids, 16)
    for hook in (None, noisy_oracle(reference, ids.shape[1], seed=1)):
        result = SelfSpeculativeDecoder(model, threshold=0.0, max_draft=3, draft_logits_fn=hook).generate(ids, 16)
        assert result.tokens == reference


def test_a_trained_mlp_adapter_survives_export_and_load(tiny_llama_dir, tmp_path):
    from kangaroo_lit.artifact import load_artifact, read_manifest

    module, _, artifact = exported_artifact(tiny_llama_dir, tmp_path, draft=DraftSettings(adapter_mlp=16))
    assert read_manifest(artifact)["adapter"]["mlp_width"] == 16
    loaded = load_artifact(artifact, dtype="float32")
    trained = module.model.adapter.state_dict()
    assert float(trained["mlp.down_proj.weight"].abs().sum()) > 0  # training moved it off zero
    for name, tensor in loaded.adapter.state_dict().items():
        torch.testing.assert_close(tensor, trained[name].to(tensor.dtype), rtol=0, atol=0)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    loaded.causal_lm.generation_config.eos_token_id = None
    loaded.causal_lm.generation_config.pad_token_id = 0
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).exit_logits, module.model(ids).exit_logits)
        result = SelfSpeculativeDecoder(loaded, threshold=0.0, max_draft=3).generate(ids, 8)
    assert result.tokens == greedy_reference(loaded, ids, 8)
