"""A draft trained briefly on the real stories260k model agrees with it far more than the untrained exit."""

import json
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_brief_training_lifts_top1_agreement_on_the_stories_model(shared_dir, tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "bench"))
    from sample_stories import sample_stories
    from stories_drafts import agreement

    from kangaroo_lit.architectures import load_base_model
    from kangaroo_lit.artifact import export_checkpoint, load_artifact
    from kangaroo_lit.cli import run_lightning
    from kangaroo_lit.model import KangarooModel

    model_dir = str(shared_dir / "models" / "stories260k-hf")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_stories(model_dir, 256, seed=0)))
    heldout = sample_stories(model_dir, 24, seed=1)

    run_lightning(["fit", "--config", str(REPO_ROOT / "configs/stories.yaml"), "--model.base_model", model_dir,
                   "--data.data_path", str(train), "--trainer.max_steps", "300", "--trainer.val_check_interval",
                   "300", "--trainer.default_root_dir", str(tmp_path), "--data.cache_dir", str(tmp_path / "cache")])
    trained = load_artifact(export_checkpoint(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "art"))
    untrained = KangarooModel(load_base_model(model_dir), 1).eval()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    stories = [tok(t).input_ids + [tok.eos_token_id] for t in heldout]
    before, _ = agreement(untrained, stories)
    after, expected_accept = agreement(trained, stories)
    assert before < 0.10  # DESIGN §4: ~4% at exit layer 1
    assert after > 0.35 and after > 4 * before, (before, after)
    assert expected_accept > 0.35

    from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder

    prompt = torch.tensor([stories[0][:8]])
    spec = SelfSpeculativeDecoder(trained, threshold=0.3).generate(prompt, 100, tok.eos_token_id)
    assert spec.tokens == VanillaDecoder(trained).generate(prompt, 100, tok.eos_token_id).tokens
    assert spec.mat > 1.3
