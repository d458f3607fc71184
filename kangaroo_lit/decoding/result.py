"""What one generation returns: the new tokens and the statistics Spec-Bench reports."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DecodeResult:
    """New tokens of one sequence plus decoding statistics.

    Attributes:
        tokens: the generated token ids (the prompt excluded; an EOS that stopped generation included).
        accept_lengths: one entry per forward pass of the full (verifying) model, the prefill included
            (it yields one token): the tokens that pass contributed to ``tokens``, i.e. accepted drafts
            + 1, less whatever was cut at EOS / ``max_new_tokens``. ``sum(accept_lengths) == len(tokens)``.
        drafted: draft tokens proposed (and verified) over all rounds.
        accepted: draft tokens the verification accepted (counted before any cut at EOS or
            ``max_new_tokens``, so ``accepted / drafted`` measures the drafter).
        full_passes: forward passes of the full model (prefill + one per round).
        draft_steps: single-token steps of the draft path (shallow layers -> adapter -> exit head).
        lookup_drafted: the part of ``drafted`` copied by prompt lookup (not the draft path).
        lookup_accepted: the part of ``accepted`` that was copied by prompt lookup.
        round_drafted: per round (after the prefill), the draft tokens its verification pass checked
            (a tree's nodes): with ``draft_steps``, what the cost model needs to predict the time.
        wall_time_s: wall-clock seconds of the whole generation, prefill included.
    """

    tokens: list[int] = field(default_factory=list)
    accept_lengths: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    full_passes: int = 0
    draft_steps: int = 0
    lookup_drafted: int = 0
    lookup_accepted: int = 0
    round_drafted: list[int] = field(default_factory=list)
    wall_time_s: float = 0.0

    @property
    def new_tokens(self) -> int:
        """Number of generated tokens."""
        return len(self.tokens)

    @property
    def mat(self) -> float:
        """Mean accepted tokens per full-model pass (Spec-Bench's MAT); 0 for an empty result."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0

    @property
    def accept_rate(self) -> float:
        """Accepted drafts / drafted tokens, in [0, 1]; 0 when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per wall-clock second; 0 when no time was measured."""
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0
