"""Decoding with a draft through Hugging Face ``generate`` (``custom_generate``, callable and directory) and
the Python API (``load_draft``): greedy identical to plain ``generate`` on four architectures (float64),
sampling exact, the streamer, EOS and length, the refusals, and the transformers internals relied on."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from kangaroo_lit import load_draft
from kangaroo_lit.decoding.sampling import SamplingConfig
from kangaroo_lit.draft import Draft
from kangaroo_lit.errors import ConfigError
from kangaroo_lit.hf import kangaroo_generate
from kangaroo_lit.settings import DecodingSettings
from tests.conftest import ARCHITECTURES
from tests.helpers import SAMPLING_TV_BOUND, build_small_model, exact_distribution, exported_artifact, total_variation

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = torch.tensor([[5, 17, 42, 9, 33, 8]])
NEW = 20


@pytest.fixture(scope="module")
def artifacts(tiny_model_dirs, tmp_path_factory):
    """{arch: (model_dir, artifact)}: a few training steps with draft-scoped LoRA, exported."""
    out = {}
    for arch in ARCHITECTURES:
        _, _, artifact = exported_artifact(tiny_model_dirs[arch], tmp_path_factory.mktemp(f"art-{arch}"))
        out[arch] = (tiny_model_dirs[arch], artifact)
    return out


@pytest.fixture(scope="module")
def llama_draft(artifacts):
    draft = load_draft(artifacts["llama"][1], dtype="float64", threshold=0.0, max_draft=3)
    draft.base_model.generation_config.eos_token_id = None  # EOS only where a test asks for it
    return draft


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_through_generate_is_plain_generate(arch, artifacts):
    model_dir, artifact = artifacts[arch]
    # callable: the Python API's draft, generate on its base
    draft = load_draft(artifact, dtype="float64", threshold=0.0, max_draft=4)
    lm = draft.base_model
    plain = lm.generate(PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    custom = kangaroo_generate(draft)
    out = lm.generate(PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=None, custom_generate=custom)
    assert out.tolist() == plain.tolist()
    assert custom.last_result.drafted > 0 and custom.last_result.new_tokens == NEW
    assert draft.generate(PROMPT, NEW, eos_token_id=[]).tokens == plain[0, PROMPT.shape[1]:].tolist()
    assert lm.generate(PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=None).tolist() == plain.tolist()

    # directory: the artifact's custom_generate/generate.py, built on the user's own model
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    reference = base.generate(PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    assert reference.tolist() == plain.tolist()
    for _ in range(2):  # the second call reuses the draft kept on the model
        out = base.generate(PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                            custom_generate=str(artifact), trust_remote_code=True)
        assert out.tolist() == reference.tolist()
    assert len(base.__dict__["_kangaroo_drafts"]) == 1
    # the LoRA layers are parked: the model's own generate is still the base's
    assert base.generate(PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=None).tolist() == reference.tolist()


def test_streamer_eos_length_and_return_dict(llama_draft):
    lm = llama_draft.base_model
    plain = lm.generate(PROMPT, max_new_tokens=NEW, do_sample=False)[0, PROMPT.shape[1]:].tolist()

    streamer = Recorder()
    out = lm.generate(PROMPT, max_new_tokens=NEW, do_sample=False, streamer=streamer,
                      custom_generate=kangaroo_generate(llama_draft))
    assert streamer.puts[0].tolist() == PROMPT.tolist()  # the prompt first, as generate does
    assert all(p.shape == (1,) for p in streamer.puts[1:])
    assert [int(p) for p in streamer.puts[1:]] == plain == out[0, PROMPT.shape[1]:].tolist()
    assert streamer.ended == 1

    eos = plain[5]
    cut = plain[: plain.index(eos) + 1]
    out = lm.generate(PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                      custom_generate=kangaroo_generate(llama_draft))
    assert out[0, PROMPT.shape[1]:].tolist() == cut
    config = GenerationConfig(max_new_tokens=7, do_sample=False, return_dict_in_generate=True)
    out = lm.generate(PROMPT, generation_config=config, attention_mask=torch.ones_like(PROMPT),
                      custom_generate=kangaroo_generate(llama_draft))
    assert out.sequences[0, PROMPT.shape[1]:].tolist() == plain[:7]


@pytest.mark.parametrize("options, named", [
    (dict(input_ids=PROMPT.repeat(2, 1)), "batch of 2"),
    (dict(num_beams=2), "num_beams"),
    (dict(do_sample=True, num_return_sequences=2), "num_return_sequences"),
    (dict(repetition_penalty=1.3), "repetition_penalty"),
    (dict(min_new_tokens=3, eos_token_id=2), "min_new_tokens"),
    (dict(max_time=10.0), "max_time"),
    (dict(do_sample=True, min_p=0.1), "min_p"),
    (dict(return_dict_in_generate=True, output_scores=True), "output_scores"),
    (dict(attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]])), "padding"),
    (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens"),
])
def test_refuses_what_it_cannot_honour_exactly(llama_draft, options, named):
    options = {"input_ids": PROMPT, "max_new_tokens": 5, **options}
    with pytest.raises(ConfigError, match=named):
        llama_draft.base_model.generate(**options, custom_generate=kangaroo_generate(llama_draft))


def test_refuses_another_model_object(llama_draft, artifacts):
    other = AutoModelForCausalLM.from_pretrained(str(artifacts["llama"][0]), dtype=torch.float64)
    with pytest.raises(ConfigError, match="another model object"):
        other.generate(PROMPT, max_new_tokens=5, custom_generate=kangaroo_generate(llama_draft))


def test_transformers_internals():
    """What kangaroo_lit.hf.internals relies on: a callable gets no streamer (the prompt is already put),
    generate's frame holds it, and the warpers keep their settings in named attributes."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from kangaroo_lit.hf.internals import generate_call_arguments, warper_settings

    model = build_small_model().causal_lm
    seen = {}

    def loop(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None, **kwargs):
        seen["kwargs"] = set(kwargs)
        seen["caller"] = generate_call_arguments()
        seen["processors"] = [warper_settings(p) for p in logits_processor]
        return input_ids

    streamer = Recorder()
    model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, do_sample=True, temperature=0.5, top_k=3, top_p=0.9,
                   streamer=streamer, custom_generate=loop)
    assert "streamer" not in seen["kwargs"] and seen["caller"]["streamer"] is streamer
    assert streamer.puts[0].tolist() == [[1, 2]]
    assert seen["processors"] == [{"temperature": 0.5}, {"top_k": 3, "min_tokens_to_keep": 1},
                                  {"top_p": 0.9, "min_tokens_to_keep": 1}]
    assert {TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper}  # imported: the names exist
    with pytest.raises(Exception, match="GenerationMixin.generate"):
        generate_call_arguments()


def test_sampling_through_generate_is_exact():
    model = build_small_model()
    lm = model.causal_lm
    lm.generation_config.eos_token_id = None
    lm.generation_config.pad_token_id = 0
    draft = Draft(model, None, "", DecodingSettings(threshold=0.0, max_draft=2))
    sampling = SamplingConfig(temperature=1.0, top_k=3)
    prompt = [1, 5, 7]
    exact = exact_distribution(model, prompt, sampling, 3)
    custom = kangaroo_generate(draft)
    torch.manual_seed(0)
    counts: Counter = Counter()
    drafted = accepted = 0
    for _ in range(2000):
        out = lm.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=True, top_k=3, custom_generate=custom)
        counts[tuple(out[0, 3:6].tolist())] += 1
        drafted += custom.last_result.drafted
        accepted += custom.last_result.accepted
    assert drafted > accepted > 0
    tv = total_variation(counts, exact)
    assert tv < SAMPLING_TV_BOUND, f"TV {tv:.3f} between generate(custom_generate=...) sampling and the model"


def test_the_shipped_drafts_custom_generate_is_the_one_export_writes():
    """drafts/*/custom_generate/generate.py is written by export; a shipped copy must not drift from it."""
    from kangaroo_lit.hf.artifact_generate import GENERATE_PY
    from tests.conftest import REPO_ROOT

    shipped = sorted((REPO_ROOT / "drafts").glob("*/custom_generate/generate.py"))
    assert shipped
    for path in shipped:
        assert path.read_text() == GENERATE_PY, f"{path} differs from what export writes"


def test_two_drafts_with_lora_on_one_loaded_model(artifacts, tmp_path):
    """Loading folds each draft's LoRA into its own layers, so a second draft on the same model is fine."""
    model_dir, first = artifacts["llama"]
    _, _, second = exported_artifact(model_dir, tmp_path, max_steps=5)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    reference = base.generate(PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    for artifact in (first, second, first):
        out = base.generate(PROMPT, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                            custom_generate=str(artifact), trust_remote_code=True)
        assert out.tolist() == reference.tolist()
    drafts = base.__dict__["_kangaroo_drafts"]
    assert len(drafts) == 2 and all(d.model.lora_merged for d in drafts.values())
    first_layers, second_layers = (d.model.draft_layers for d in drafts.values())
    assert not torch.equal(first_layers[0].self_attn.q_proj.weight, second_layers[0].self_attn.q_proj.weight)
