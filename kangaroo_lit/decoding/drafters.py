"""Where a round's draft tokens come from: one interface, several sources.

A :class:`Drafter` proposes the draft tokens of one round (and, for sampling, the distribution ``q``
each was drawn from) from the decoding state, and hears afterwards how many were accepted.
:class:`~kangaroo_lit.decoding.speculative.SelfSpeculativeDecoder` writes the rest of a round once:
verify the proposal in one full-model pass, accept, roll the caches back, commit, emit, report.

* :class:`AdapterDrafter`: the Kangaroo draft path (shallow layers, adapter, exit head), token by token
  until its confidence drops below ``threshold`` or ``max_draft`` tokens (the second early exit).
* :class:`LookupDrafter`: prompt lookup, the tokens that followed the latest earlier occurrence of the
  context's last n-gram; nothing when there is none (the round is then a plain one-token step).
* :class:`LookupThenAdapter`: lookup where it matches, the adapter otherwise.

The shapes learnt from: HF's ``CandidateGenerator`` (``get_candidates`` / ``update_candidate_strategy``,
prompt lookup as one more generator, verification written once) and LayerSkip's generation strategies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kangaroo_lit.decoding.prompt_lookup import lookup_continuation
from kangaroo_lit.decoding.sampling import SamplingConfig, choose
from kangaroo_lit.settings import DRAFTER_KINDS

# (B, V) draft logits, absolute position of the token being drafted -> (B, V) logits to draft from.
# (With a restricted draft head the hook sees them scattered to V, -inf outside the draft vocabulary.)
DraftLogitsFn = Callable[[torch.Tensor, int], torch.Tensor]



@dataclass
class DecodingState:
    """What a round starts from; every tensor keeps a batch dimension (B = 1 today).

    Between rounds, with ``n`` committed tokens, every cache holds positions ``0..n-2`` (the last
    committed token, ``x``, is in none yet), except that the draft path (``draft_shallow`` under LoRA
    scope "draft", and ``adapter``) may be behind by the *pending* positions.

    Attributes:
        caches: one :class:`~transformers.DynamicCache` per path segment: ``draft_shallow``,
            ``verify_shallow`` (LoRA scope "draft" only), ``deep``, ``adapter``.
        committed: (B, n) prompt + generated ids.
        pending_ids: (B, m) committed ids the draft shallow layers have not seen (scope "draft").
        pending_hidden: (B, m, d) draft-path shallow states the adapter has not seen (shared scope).
    """

    caches: dict[str, DynamicCache]
    committed: torch.Tensor
    pending_ids: torch.Tensor
    pending_hidden: torch.Tensor


@dataclass
class Proposal:
    """The draft of one round.

    Attributes:
        tokens: (B, k) draft ids, ``k >= 0`` (0: a plain one-token step).
        probs: (k, V) the distributions the drafts were drawn from (sampling); None for greedy, and
            for copied tokens, whose ``q`` is a point mass at the token (the decoder builds it).
        shallow: (B, j, d) shallow states of the first ``j`` of ``x, d1..dk`` that drafting already wrote
            to the shared shallow cache (``x, d1..d_{k-1}``: verification runs the shallow layers on
            ``dk`` only; ``x`` alone for a draft not worth verifying), or None.
        source: ``"adapter"``, ``"lookup"``, ``"tree"`` or ``"none"``.
        draft_steps: draft-path forward calls made.
        parents: None for a chain (each token follows the one before it). For a tree, per token the
            index of its parent among ``tokens`` (-1: it follows ``x``), parents before children; the
            children of one node carry distinct tokens. A tree's candidates are chosen, not sampled, so
            it has no ``probs``, and ``shallow`` holds ``x``'s state at most (the nodes' draft-path states
            are not kept: :class:`~kangaroo_lit.decoding.tree.TreeDrafter` rolls its caches back).
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None
    shallow: torch.Tensor | None = None
    source: str = "none"
    draft_steps: int = 0
    parents: list[int] | None = None

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    @property
    def is_tree(self) -> bool:
        return self.parents is not None


def positions(start: int, length: int, batch: int, device: torch.device) -> torch.Tensor:
    """(B, length) absolute positions ``start..start+length-1`` (no padding at batch size 1)."""
    return torch.arange(start, start + length, device=device).expand(batch, length)


def empty_proposal(state: DecodingState) -> Proposal:
    """No draft: the round verifies ``x`` alone and commits the full model's next token."""
    return Proposal(tokens=state.committed[:, :0], probs=None)


def draft_path_step(model, state: DecodingState, token: torch.Tensor,
                    position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One draft-path step for ``token`` at ``position``, with the pending positions before it.

    Args:
        token: (B, 1) id.
        position: its absolute position.

    Returns:
        ``(hidden, logits)``: (B, 1, d) its draft-path shallow state and (B, V) the draft logits of
        the token after it ((B, K) over ``model.draft_vocab`` with a restricted draft head).
    """
    batch = token.shape[0]
    ids = torch.cat([state.pending_ids, token], dim=1)
    shallow = model.shallow(
        model.embed(ids),
        positions(position - ids.shape[1] + 1, ids.shape[1], batch, token.device),
        cache=state.caches["draft_shallow"],
        draft=True,
    )
    adapter_in = torch.cat([state.pending_hidden, shallow], dim=1)
    logits = model.draft_logits(
        adapter_in,
        positions(position - adapter_in.shape[1] + 1, adapter_in.shape[1], batch, token.device),
        cache=state.caches["adapter"],
    )[:, -1]
    state.pending_ids = state.pending_ids[:, :0]
    state.pending_hidden = state.pending_hidden[:, :0]
    return shallow[:, -1:], logits


class Drafter(ABC):
    """Proposes the draft tokens of a round; see the module docstring.

    ``uses_draft_path``: whether it ever runs the draft path (shallow layers + adapter). One that never
    does (prompt lookup alone) lets the decoder keep no pending positions for it.
    """

    uses_draft_path: bool = True

    @abstractmethod
    def propose(self, model, state: DecodingState, budget: int, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Proposal:
        """Draft at most ``budget`` (>= 1) tokens after ``state.committed``.

        A drafter that runs the draft path advances its caches (and consumes the pending positions);
        the decoder rolls them back to what verification accepted.
        """

    def update(self, proposal: Proposal, accepted: int) -> None:
        """Told how many of ``proposal``'s tokens the full model accepted (adaptive drafters learn here)."""
        del proposal, accepted  # most drafters do not adapt

    def start(self) -> None:
        """Called when a generation starts: a drafter that learns from the rounds forgets here what it
        learnt from another output, so that each output is decoded alike whatever came before it."""
        return  # most drafters keep nothing between rounds


class AdapterDrafter(Drafter):
    """The Kangaroo draft path: one token per step until confidence < ``threshold`` or ``max_draft``.

    A draft's *confidence* is its top probability: greedy reads the draft distribution at the model's
    calibrated temperature (``model.confidence_temperature``, fitted by ``kangaroo-lit calibrate``; 1
    without), sampling the warped distribution the draft was drawn from.

    Args:
        threshold: a draft whose confidence is below this ends the round, in [0, 1] (0: always draft
            ``max_draft``; 1: draft exactly one).
        max_draft: most tokens per round (>= 1).
        draft_logits_fn: test hook, see :data:`DraftLogitsFn`.
        skip_below: a round whose *first* draft's confidence is below this verifies no draft: it is a
            plain one-token step (the draft step is spent, the wider verification pass saved). In [0, 1];
            0 = off. Worth it below break-even, ``v_2 - 1`` of the cost model (``bench cost_model``).
    """

    def __init__(self, threshold: float = 0.6, max_draft: int = 6, draft_logits_fn: DraftLogitsFn | None = None,
                 skip_below: float = 0.0):
        if max_draft < 1:
            raise ValueError(f"max_draft must be >= 1, got {max_draft}")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if not 0 <= skip_below <= 1:
            raise ValueError(f"skip_below must be in [0, 1], got {skip_below}")
        self.threshold = threshold
        self.max_draft = max_draft
        self.draft_logits_fn = draft_logits_fn
        self.skip_below = skip_below

    def propose(self, model, state, budget, sampling, generator) -> Proposal:
        x_pos = state.committed.shape[1] - 1
        k_max = max(1, min(self.max_draft, budget))
        temperature = float(getattr(model, "confidence_temperature", 1.0))
        shallow_states, drafts, draft_probs = [], [], []
        token = state.committed[:, -1:]
        for i in range(1, k_max + 1):
            hidden, logits = draft_path_step(model, state, token, x_pos + i - 1)
            if self.draft_logits_fn is not None:
                logits = self.draft_logits_fn(model.scatter_draft(logits, float("-inf")), x_pos + i)
                draft, probs = choose(logits, sampling, generator)
            else:
                # Restricted head: choose among its K ids, then map to the token id and widen q to V
                # (zero outside the set) for the rejection step. Identities for a full-vocabulary head.
                choice, probs = choose(logits, sampling, generator)
                draft = model.draft_token_ids(choice)
                if probs is not None:
                    probs = model.scatter_draft(probs)
            shallow_states.append(hidden)
            if self.threshold > 0 or self.skip_below > 0:
                conf_probs = (logits.float() / temperature).softmax(dim=-1) if probs is None else probs
                confidence = float(conf_probs.max(dim=-1).values[0])
                if i == 1 and confidence < self.skip_below:
                    # Not worth verifying: a plain step. The draft path has taken x (its state is kept).
                    return Proposal(tokens=state.committed[:, :0], probs=None,
                                    shallow=hidden if model.shallow_is_shared else None, source="adapter",
                                    draft_steps=1)
            drafts.append(draft)
            draft_probs.append(probs)
            token = draft[:, None]
            if i == k_max or self.threshold >= 1:
                break
            if self.threshold > 0 and confidence < self.threshold:
                break
        return Proposal(
            tokens=torch.stack(drafts, dim=1),
            probs=None if sampling.greedy else torch.cat(draft_probs, dim=0),
            shallow=torch.cat(shallow_states, dim=1) if model.shallow_is_shared else None,
            source="adapter",
            draft_steps=len(drafts),
        )


class LookupDrafter(Drafter):
    """Prompt lookup: copy the tokens that followed the latest earlier occurrence of the last n-gram.

    A copied token is a draft from a point mass ``q`` (sampling: accepted with probability ``p(d)``,
    else resampled from ``p`` without ``d``), so sampling stays exact. Copies have not been through
    the draft path; they join its pending positions, which the next adapter step takes in.

    With a cost model the window is sized every round, as the adapter's chains are: of the ``m`` tokens
    the match offers it verifies the ``k <= m`` that maximise the expected tokens per unit of cost,
    ``(1 + sum_{i<=k} prod_{j<=i} r_j) / v_{k+1}``, where ``r_j`` is the running rate at which the j-th
    copied token was accepted when every copy before it was (this output's rounds so far, shrunk toward
    ``r_{j-1}``, and ``r_1`` toward 1/2, while they are few). ``k = 0`` verifies nothing: a plain step,
    or the adapter's round under :class:`LookupThenAdapter`; after :attr:`EXPLORE_AFTER` matches in a row
    sized so, one copied token is verified anyway, so that a window that early failures closed can reopen
    when the output turns to quoting its context. Where verifying k tokens costs about one step
    (a GPU) that is the whole match; on a CPU core, where ``v_8`` is 1.6-2.4 steps, it is shorter where
    copies fail and longer where they hold (BENCHMARKS.md, "Prompt lookup's window, sized by the cost
    model").

    Args:
        max_tokens: most tokens copied per round (>= 1).
        ngram: ``(min, max)`` n-gram sizes matched; the longest match wins.
        cost: the :class:`~kangaroo_lit.decoding.cost.DecodeCost` to size the window by; None copies
            ``max_tokens`` whenever the match offers them.
    """

    uses_draft_path = False
    # The running rates start at 1/2 for the first copied token, and a later position at the rate of the
    # one before it, each worth this many rounds until rounds of its own outweigh it.
    PRIOR_RATE = 0.5
    PRIOR_ROUNDS = 2.0
    EXPLORE_AFTER = 8

    def __init__(self, max_tokens: int, ngram: tuple[int, int] = (2, 3), cost=None):
        if max_tokens < 1:
            raise ValueError(f"prompt lookup needs max_tokens >= 1, got {max_tokens}")
        if not 1 <= ngram[0] <= ngram[1]:
            raise ValueError(f"prompt_lookup_ngram must be (min, max) with 1 <= min <= max, got {ngram}")
        self.max_tokens = max_tokens
        self.ngram = tuple(ngram)
        self.cost = cost
        self.start()

    def start(self) -> None:
        # judged[j]: rounds in which copied token j + 1 was judged (every copy before it accepted);
        # kept[j]: of those, the rounds that accepted it.
        self.judged = [0] * self.max_tokens
        self.kept = [0] * self.max_tokens
        self.closed = 0  # matches in a row whose window was 0

    def acceptance_rates(self) -> list[float]:
        """``[r_1, ..., r_max_tokens]``: the running rate at which copied token j was accepted when every
        copy before it was."""
        rates, prior = [], self.PRIOR_RATE
        for judged, kept in zip(self.judged, self.kept):
            prior = (kept + self.PRIOR_ROUNDS * prior) / (judged + self.PRIOR_ROUNDS)
            rates.append(prior)
        return rates

    def window(self, offered: int) -> int:
        """How many of ``offered`` copied tokens to verify (0..offered): the cost model's best (see above)."""
        best_k, best_value = 0, 1.0 / self.cost.verify_cost(1)
        expected, reach = 0.0, 1.0
        for k, rate in enumerate(self.acceptance_rates()[:offered], start=1):
            reach *= rate
            expected += reach
            value = (1.0 + expected) / self.cost.verify_cost(k + 1)
            if value > best_value:
                best_k, best_value = k, value
        return best_k

    def propose(self, model, state, budget, sampling, generator) -> Proposal:
        copied = lookup_continuation(state.committed[0], max(1, min(self.max_tokens, budget)), *self.ngram)
        if self.cost is not None and copied.numel():
            k = self.window(copied.numel())
            self.closed = self.closed + 1 if k == 0 else 0
            if self.closed > self.EXPLORE_AFTER:
                k, self.closed = 1, 0
            copied = copied[:k]
        if not copied.numel():
            return empty_proposal(state)
        return Proposal(tokens=copied[None], probs=None, source="lookup")  # q: point masses

    def update(self, proposal: Proposal, accepted: int) -> None:
        for j in range(min(proposal.size, accepted + 1)):  # the copies judged: the accepted ones and the first miss
            self.judged[j] += 1
            self.kept[j] += j < accepted


class LookupThenAdapter(Drafter):
    """Prompt lookup where the context's last n-gram occurred before, the adapter otherwise."""

    def __init__(self, lookup: LookupDrafter, adapter: AdapterDrafter):
        self.lookup = lookup
        self.adapter = adapter

    def propose(self, model, state, budget, sampling, generator) -> Proposal:
        proposal = self.lookup.propose(model, state, budget, sampling, generator)
        if proposal.size:
            return proposal
        return self.adapter.propose(model, state, budget, sampling, generator)

    def update(self, proposal: Proposal, accepted: int) -> None:
        (self.lookup if proposal.source == "lookup" else self.adapter).update(proposal, accepted)

    def start(self) -> None:
        self.lookup.start()
        self.adapter.start()


def make_drafter(kind: str = "adapter", threshold: float = 0.6, max_draft: int = 6, prompt_lookup: int = 0,
                 prompt_lookup_ngram: tuple[int, int] = (2, 3),
                 draft_logits_fn: DraftLogitsFn | None = None, skip_below: float = 0.0, tree_width: int = 4,
                 tree_nodes: int = 7, tree_depth: int = 6, cost=None, lookup_cost=None) -> Drafter:
    """The drafter for a decoding configuration.

    Args:
        kind: ``"adapter"`` (with ``prompt_lookup > 0``: lookup where it matches, else the adapter),
            ``"tree"`` (likewise with a :class:`~kangaroo_lit.decoding.tree.TreeDrafter` for the adapter)
            or ``"lookup"`` (lookup only: a round without a match is a plain one-token step).
        threshold, max_draft, draft_logits_fn, skip_below: the adapter's (:class:`AdapterDrafter`).
        prompt_lookup: most tokens copied per round (0: no lookup; ``kind="lookup"`` needs >= 1).
        prompt_lookup_ngram: ``(min, max)`` n-gram sizes matched.
        tree_width, tree_nodes, tree_depth: the tree drafter's ``width``, ``max_nodes``, ``max_depth``.
        cost: the tree drafter's :class:`~kangaroo_lit.decoding.cost.DecodeCost` (default: the CPU table
            of the eager kernel).
        lookup_cost: the cost model prompt lookup sizes its window by (:class:`LookupDrafter`); None: a
            fixed window of ``prompt_lookup`` tokens.

    Raises:
        ValueError: an unknown kind or an inconsistent setting.
    """
    if kind not in DRAFTER_KINDS:
        raise ValueError(f"drafter must be one of {', '.join(DRAFTER_KINDS)}; got {kind!r}")
    if prompt_lookup < 0:
        raise ValueError(f"prompt_lookup must be >= 0 (tokens; 0 = off), got {prompt_lookup}")
    if kind == "lookup" and prompt_lookup < 1:
        raise ValueError("drafter 'lookup' needs prompt_lookup >= 1 (tokens copied per round)")
    if kind == "tree":
        from kangaroo_lit.decoding.cost import default_cost
        from kangaroo_lit.decoding.tree import TreeDrafter

        adapter = TreeDrafter(cost or default_cost("cpu"), tree_width, tree_nodes, tree_depth, draft_logits_fn)
    else:
        adapter = AdapterDrafter(threshold, max_draft, draft_logits_fn, skip_below)
    if kind == "lookup":
        return LookupDrafter(prompt_lookup, prompt_lookup_ngram, lookup_cost)
    if prompt_lookup:
        return LookupThenAdapter(LookupDrafter(prompt_lookup, prompt_lookup_ngram, lookup_cost), adapter)
    return adapter
