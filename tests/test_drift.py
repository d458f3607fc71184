"""The drift report (DriftReportCallback, added by the module itself): the verifier's perplexity and greedy
agreement against the original model, teacher-forced on held-out batches."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from kangaroo_lit.callbacks import DriftReportCallback
from kangaroo_lit.settings import LoraSettings
from tests.helpers import fit, make_module, toy_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def direct(model, batches):
    """float64 perplexities of the original (LoRA off) and the verifier, and their argmax agreement."""
    nll = {"original": 0.0, "full": 0.0}
    agree = tokens = 0
    with torch.no_grad():
        for batch in batches:
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            logits = {}
            with model.lora_enabled(False):
                logits["original"] = model.full_logits(batch["input_ids"])[:, :-1].double()
            logits["full"] = model.full_logits(batch["input_ids"])[:, :-1].double()
            for name, value in logits.items():
                logp = torch.log_softmax(value, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                nll[name] -= float(logp[mask].sum())
            agree += int(((logits["original"].argmax(-1) == logits["full"].argmax(-1)) & mask).sum())
            tokens += int(mask.sum())
    return math.exp(nll["original"] / tokens), math.exp(nll["full"] / tokens), agree / tokens


def validate(module, batches):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)
    assert any(isinstance(cb, DriftReportCallback) for cb in trainer.callbacks)  # from configure_callbacks
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_shared_scope_reports_drift(tiny_llama_dir):
    module = make_module(tiny_llama_dir, dtype="float64", lora=LoraSettings(rank=4, dropout=0.0, scope="shared"))
    fit(module, toy_batches(3), max_steps=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a visibly drifted verifier
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.3)
    held_out = toy_batches(2, seed=7)
    metrics = validate(module, held_out)
    ppl_original, ppl_full, agree = direct(module.model.eval(), held_out)
    assert agree < 1.0 and abs(ppl_original - ppl_full) > 1e-3 * ppl_full
    assert metrics["val/drift_agree"] == pytest.approx(agree, abs=1e-7)
    assert metrics["val/ppl_original"] == pytest.approx(ppl_original, rel=1e-6)
    assert metrics["val/ppl_full"] == pytest.approx(ppl_full, rel=1e-5)  # the module's own (fp32 loss)


def test_draft_scope_verifier_is_the_original(tiny_llama_dir):
    module = make_module(tiny_llama_dir, dtype="float64", lora=LoraSettings(rank=4, dropout=0.0, scope="draft"))
    fit(module, toy_batches(3), max_steps=3)
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.3)  # LoRA is large, and acts on the draft path only
    held_out = toy_batches(2, seed=7)
    metrics = validate(module, held_out)
    ppl_original, ppl_full, agree = direct(module.model.eval(), held_out)
    assert agree == 1.0 and metrics["val/drift_agree"] == 1.0
    assert metrics["val/ppl_original"] == pytest.approx(ppl_original, rel=1e-6)
    assert metrics["val/ppl_original"] == pytest.approx(metrics["val/ppl_full"], rel=1e-5)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, DataLoader(held_out, batch_size=None), verbose=False)
    assert float(trainer.callback_metrics["test/drift_agree"]) == 1.0
    assert float(trainer.callback_metrics["test/ppl_original"]) == pytest.approx(ppl_original, rel=1e-6)
