"""The trained drafts shipped in ``drafts/``: well-formed (default tier), and (slow, when the base model is
pulled) decoding with them is lossless and actually accepts drafts."""

from pathlib import Path

import pytest

from kangaroo_lit import model_zoo
from kangaroo_lit.artifact import read_manifest

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_DRAFT = ROOT / "drafts" / "smollm2-135m-instruct"


def test_smollm2_draft_is_small_and_names_its_base_by_short_name():
    manifest = read_manifest(SMOLLM2_DRAFT)  # strict: every field, the LoRA config, the training record
    assert manifest["base_model"] == "model:smollm2-135m-instruct"  # no path of one machine
    assert manifest["draft_vocab_size"] == 8192 and manifest["lora"]["scope"] == "draft"
    assert (SMOLLM2_DRAFT / "draft_vocab.safetensors").is_file()
    size = sum(f.stat().st_size for f in SMOLLM2_DRAFT.rglob("*") if f.is_file())
    assert size < 10 * 2**20, f"{size} bytes: the base's weights must not be copied into the draft"


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["eager", "streaming"])
def test_smollm2_draft_decodes_like_greedy_and_accepts_drafts(kernel):
    if not model_zoo.is_pulled("smollm2-135m-instruct"):
        pytest.skip("smollm2-135m-instruct is not pulled (kangaroo-lit pull --name smollm2-135m-instruct)")
    import torch
    from transformers import AutoTokenizer

    from kangaroo_lit.artifact import load_artifact
    from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder, reference_model
    from kangaroo_lit.kernels import streaming_linear
    from kangaroo_lit.specbench.methods import plain_generation_config

    if kernel == "streaming" and not streaming_linear.available()[0]:
        pytest.skip(f"streaming kernel unavailable: {streaming_linear.available()[1]}")
    model = load_artifact(SMOLLM2_DRAFT, dtype="float32", device="cpu")
    tok = AutoTokenizer.from_pretrained(model_zoo.model_path("smollm2-135m-instruct"))
    drafted = accepted = 0
    for question in ("What is the capital of France?", "Give three tips for staying healthy."):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        # the checkpoint's generation_config.json may sample or penalise repeats: plain greedy here
        with (torch.no_grad(), reference_model(model) as lm,  # the verifier: LoRA off (scope "draft")
              plain_generation_config(lm, [tok.eos_token_id], tok.eos_token_id)):
            reference = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False)
        expected = reference[0, ids.shape[1]:].tolist()
        with streaming_linear.streaming_linears(model, kernel == "streaming"):
            assert VanillaDecoder(model).generate(ids, 48, tok.eos_token_id).tokens == expected
            result = SelfSpeculativeDecoder(model, threshold=0.4, max_draft=6, prompt_lookup=7).generate(
                ids, 48, tok.eos_token_id)
        assert result.tokens == expected
        drafted += result.drafted
        accepted += result.accepted
    assert accepted / drafted > 0.15, (accepted, drafted)  # a trained draft; untrained ones accept ~2%
