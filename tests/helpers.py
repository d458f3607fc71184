"""Helpers shared by test modules (tests import from here or from conftest.py, never from each other)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from kangaroo_lit.lit_module import KangarooLitModule
from kangaroo_lit.settings import DraftSettings, LoraSettings, LossSettings, OptimizerSettings


def toy_batches(n_batches=4, batch=2, length=12, vocab=300, seed=0):
    """Right-padded batches with a masked prompt, as the data module makes them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab, (batch, length), generator=g)
        attn = torch.ones_like(ids)
        attn[1, -3:] = 0
        labels = ids.clone()
        labels[:, :4] = -100
        labels[attn == 0] = -100
        out.append({"input_ids": ids, "attention_mask": attn, "labels": labels})
    return out


def make_module(model_dir, *, exit_layer=1, lora=None, draft=None, loss=None, optimizer=None, **kwargs):
    """A built KangarooLitModule on ``model_dir``: LoRA rank 4, lr 1e-2, 1 warm-up step unless given."""
    module = KangarooLitModule(
        base_model=str(model_dir),
        exit_layer=exit_layer,
        lora=lora or LoraSettings(rank=4),
        draft=draft or DraftSettings(),
        loss=loss or LossSettings(),
        optimizer=optimizer or OptimizerSettings(lr=1e-2, warmup_steps=1),
        **kwargs,
    )
    module.configure_model()
    return module


def fit(module, batches, max_steps=3, **trainer_kw):
    """Train ``module`` on ``batches`` (dicts, used as they are) on CPU, nothing written."""
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kw)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def trained_checkpoint(model_dir, root, max_steps=3, **make_module_kw):
    """Train ``make_module(model_dir, **make_module_kw)`` for a few toy steps with the project's checkpoint
    callback; returns ``(module in eval mode, root / "checkpoints" / "last.ckpt")``."""
    from kangaroo_lit.checkpointing import KangarooCheckpoint

    module = make_module(model_dir, **make_module_kw)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, default_root_dir=root,
                        callbacks=[KangarooCheckpoint()], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(toy_batches(max_steps), batch_size=None))
    return module.eval(), root / "checkpoints" / "last.ckpt"


class SendSignalAt(L.Callback):
    """Send ``signum`` to this process at the end of training step ``step`` (a scheduler's preemption)."""

    def __init__(self, step: int, signum: int = 15) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import os

        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def exported_artifact(model_dir, root, **make_module_kw):
    """``trained_checkpoint(model_dir, root, **make_module_kw)`` exported to ``root / "artifact"``; returns
    ``(module in eval mode, checkpoint path, artifact directory)``."""
    from kangaroo_lit.artifact import export_checkpoint

    module, ckpt = trained_checkpoint(model_dir, root, **make_module_kw)
    return module, ckpt, export_checkpoint(ckpt, root / "artifact")


# ---------------------------------------------------------------------------------------------------
# Decoding: a draft hook, the small exactly-enumerable model of the sampling tests, and their distance


def noisy_oracle(reference: list[int], prompt_length: int, seed: int, p_agree: float = 0.75):
    """Draft hook: the true next token with probability ``p_agree`` (confidence varies), else a wrong one."""
    import random

    rng = random.Random(seed)

    def hook(logits: torch.Tensor, position: int) -> torch.Tensor:
        logits = logits.clone()
        target = reference[position - prompt_length]
        if rng.random() < p_agree:
            logits[:, target] = logits.max() + 0.1 + rng.uniform(0.0, 4.0)
        elif int(logits.argmax()) == target:
            logits[:, target] = logits.min() - 1.0
        return logits

    return hook


def repeating_prompt(rng, vocab: int, repeats: tuple[int, int] = (2, 4)) -> torch.Tensor:
    """(1, T) ids: a random chunk repeated ``repeats`` (min, max) times, then one token: prompt lookup finds it."""
    chunk = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 5))]
    return torch.tensor([chunk * rng.randint(*repeats) + [rng.randrange(3, vocab)]])


# Expected TV of 3000 exact draws over 27 outcomes is about 0.03.
SAMPLING_TV_BOUND = 0.07


def build_small_model(mode: str = "off", draft_vocab: torch.Tensor | None = None):
    """2 layers, vocabulary 12, exit layer 0, float64; the untrained draft is accepted about 60% of the time (off)."""
    from transformers import AutoModelForCausalLM

    from kangaroo_lit.model import KangarooModel
    from kangaroo_lit.tiny import tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=12, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    base.requires_grad_(False)
    with torch.no_grad():
        base.lm_head.weight.mul_(10.0)  # peaked enough that the top-k tokens are not equiprobable
    lora = None if mode == "off" else LoraSettings(rank=2, dropout=0.0, scope=mode)
    model = KangarooModel(base, exit_layer=0, lora=lora, trainable_dtype=torch.float64, draft_vocab=draft_vocab).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    return model


def exact_distribution(model, prompt: list[int], sampling, first: int) -> dict[tuple[int, ...], float]:
    """P(first ``first`` tokens after ``prompt``) under the verifying model, enumerating the warped support."""
    from kangaroo_lit.decoding import probabilities

    dist: dict[tuple[int, ...], float] = {(): 1.0}
    with torch.inference_mode():
        for _ in range(first):
            grown = {}
            for prefix, mass in dist.items():
                probs = probabilities(model.full_logits(torch.tensor([prompt + list(prefix)]))[0, -1], sampling)
                for tok in probs.nonzero().flatten().tolist():
                    grown[prefix + (tok,)] = mass * float(probs[tok])
            dist = grown
    return dist


def total_variation(counts, exact: dict[tuple[int, ...], float]) -> float:
    """Total variation between empirical ``counts`` (a Counter) and an exact distribution."""
    total = sum(counts.values())
    keys = set(counts) | set(exact)
    return 0.5 * sum(abs(counts[k] / total - exact.get(k, 0.0)) for k in keys)
