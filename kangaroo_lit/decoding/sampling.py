"""Logits warping and speculative rejection sampling.

The draft and the verifying model go through the *same* warping (temperature, then top-k, then top-p,
the order of Hugging Face ``generate``), so ``q`` and ``p`` below are the distributions actually sampled
from. Speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023) then makes every emitted
token follow ``p`` exactly, whatever the draft proposes:

* accept draft token ``x ~ q`` with probability ``min(1, p(x) / q(x))``;
* on rejection resample from ``norm(max(0, p - q))``;
* when all drafts are accepted, the bonus token is sampled from the next ``p``.

Temperature 0 means greedy: argmax, and top-k / top-p are ignored (as with ``do_sample=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. ``temperature == 0`` is greedy decoding.

    Attributes:
        temperature: softmax temperature; 0 for greedy.
        top_k: keep only the ``top_k`` most likely tokens (0 = all).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1 = all).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warp_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Apply temperature, top-k and top-p to logits; removed tokens get ``-inf``.

    Args:
        logits: (..., V) raw logits (any float dtype; computed in float32 or wider).
        config: a sampling (not greedy) configuration.

    Returns:
        (..., V) warped logits in float32 (float64 if the input is float64).
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(dtype) / config.temperature
    vocab = logits.shape[-1]
    if 0 < config.top_k < vocab:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        # As HF's TopPLogitsWarper: drop the low tail whose cumulative probability is <= 1 - top_p,
        # always keeping at least the most likely token.
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - config.top_p)
        remove_sorted[..., -1] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """(..., V) logits -> (..., V) probabilities of the warped distribution."""
    return warp_logits(logits, config).softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row.

    Args:
        probs: (B, V) probabilities (rows need not be normalised exactly).
        generator: random generator on ``probs``' device, or None for the global one.

    Returns:
        (B,) long tensor of token ids.
    """
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def choose(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None):
    """Pick the next token from (B, V) logits: argmax when greedy, else a sample of the warped distribution.

    Returns:
        ``(tokens, probs)``: (B,) token ids and the (B, V) distribution sampled from (None when greedy).
    """
    if config.greedy:
        return logits.argmax(dim=-1), None
    probs = probabilities(logits, config)
    return sample(probs, generator), probs


def rejection_sample(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Speculative rejection sampling of one round (one sequence).

    Args:
        draft_tokens: (k,) drafted token ids, ``draft_tokens[i] ~ draft_probs[i]``.
        draft_probs: (k, V) warped draft distributions ``q_1..q_k``.
        target_probs: (k + 1, V) warped distributions of the verifying model; row ``i`` is the
            distribution of the token that follows the first ``i`` drafts (row ``k`` gives the bonus).
        generator: random generator on the tensors' device, or None.

    Returns:
        ``(n_accepted, next_token)``: how many leading drafts are accepted, and the token that follows
        them (a resample from ``norm(max(0, p - q))`` after a rejection, else the bonus from ``p_k``).
    """
    k = draft_tokens.shape[0]
    idx = draft_tokens.view(k, 1)
    p = target_probs[:k].gather(-1, idx).squeeze(-1)
    q = draft_probs.gather(-1, idx).squeeze(-1)
    u = torch.rand(k, generator=generator, device=draft_probs.device, dtype=p.dtype)
    # Accept with probability min(1, p/q), written as u * q < p to avoid dividing (q > 0: x ~ q).
    rejected = (u * q >= p).nonzero()
    n_accepted = int(rejected[0, 0]) if rejected.numel() else k
    if n_accepted == k:
        return k, int(sample(target_probs[k : k + 1], generator)[0])
    residual = (target_probs[n_accepted] - draft_probs[n_accepted]).clamp_min(0)
    if float(residual.sum()) <= 0:
        # Only reachable through rounding (p == q rejects with probability 0): fall back to p.
        residual = target_probs[n_accepted]
    return n_accepted, int(sample(residual[None], generator)[0])
