"""Lossless self-speculative decoding with double early exiting (Kangaroo), batch size 1.

One round (DESIGN.md §3), with ``x`` the last committed token, not yet in any cache:

1. Draft: ``x`` -> shallow layers ``0..L`` -> adapter -> exit head -> ``d1``; then ``d1`` -> ... -> ``d2``
   and so on, at least one and at most ``max_draft`` tokens; a draft whose top-1 probability is below
   ``threshold`` is kept and ends the round (the second early exit).
2. Verify: one forward pass of the deep layers ``L+1..N-1`` over the shallow states of
   ``[x, d1..dk]``. Shallow states computed while drafting are reused (no LoRA, or
   ``lora_scope="shared"``; ``dk`` takes one more shallow step); with ``lora_scope="draft"`` the pass
   runs the *original* shallow layers (LoRA off, their own cache) over ``[x, d1..dk]`` first.
3. Accept the longest agreeing prefix (greedy) or the prefix that survives rejection sampling, plus
   one token of the full model (the correction, or the bonus when every draft is accepted).
4. Roll every cache back to the committed length.

Prompt lookup (``prompt_lookup`` N > 0): a round whose last committed n-gram occurred earlier in the
context drafts the (at most N) tokens that followed it instead of running the draft path; verification
is the same pass. Those tokens have not been through the draft path, so they join the *pending* tokens
(below) that enter it with the next adapter round's first step. Sampling stays exact: a copied token is
a draft from a point mass ``q`` (accepted with probability ``p(d)``, else resampled from ``p`` without
``d``).

A restricted draft head (``draft.vocab_size`` K) gives (B, K) draft logits over ``model.draft_vocab``:
greedy takes the argmax over K and maps it to its token id; sampling warps and normalises over K, then
scatters ``q`` to the full vocabulary (zero elsewhere) for the rejection step, which with ``p`` the full
model's distribution stays exactly lossless. Verification is unchanged.

Cache layout: one :class:`transformers.DynamicCache` per path segment, each written at the decoder's
own layer indices:

* ``draft_shallow``: layers ``0..L`` of the draft path (the only shallow cache when it is shared);
* ``verify_shallow``: layers ``0..L`` without LoRA (``lora_scope="draft"`` only);
* ``deep``: layers ``L+1..N-1``;
* ``adapter``: the adapter's own one-layer cache (index 0).

Between rounds, with ``n`` committed tokens (prompt + generated), every cache holds positions
``0..n-2``: the last committed token is the next round's ``x``. One exception, a saving: when every
draft of a round is accepted, the draft path has not yet seen ``dk`` (the adapter never, the LoRA
shallow layers of scope "draft" neither). Rather than a separate catch-up call, ``dk`` stays *pending*
and enters the draft path together with the next round's ``x`` (a two-position step), so the draft
caches are one position short in between (:attr:`RoundInfo.pending`). After a prompt-lookup round
the draft path is short by ``x`` and the accepted tokens as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kangaroo_lit.decoding.common import check_inputs, eos_set, synchronize
from kangaroo_lit.decoding.kv_cache import cache_length, crop_layers
from kangaroo_lit.decoding.prompt_lookup import lookup_continuation
from kangaroo_lit.decoding.result import DecodeResult
from kangaroo_lit.decoding.sampling import SamplingConfig, choose, probabilities, rejection_sample
from kangaroo_lit.model import KangarooModel


@dataclass
class RoundInfo:
    """Debug record of one full-model pass, given to the ``on_round`` callback after rollback.

    Attributes:
        index: 0 for the prefill, then 1, 2, ... per round.
        drafted: the draft tokens of the round (empty for the prefill).
        accepted: how many of them the verification accepted.
        emitted: the tokens this pass appended to the output (after any cut at EOS / budget).
        committed_length: prompt + tokens committed by the passes so far (after the last pass this may
            exceed the output, which is cut at EOS / ``max_new_tokens``).
        cache_lengths: per cache segment (``draft_shallow``, ``verify_shallow``, ``deep``, ``adapter``),
            the cached length of each of its layers.
        pending: per draft segment (``draft_shallow``, ``adapter``), positions computed by the full path
            but not yet by the draft path (see the module docstring).
        lookup: whether the round's drafts came from prompt lookup (not the draft path).
    """

    index: int
    drafted: list[int]
    accepted: int
    emitted: list[int]
    committed_length: int
    cache_lengths: dict[str, list[int]]
    pending: dict[str, int]
    lookup: bool = False


# (B, V) draft logits, absolute position of the token being drafted -> (B, V) logits to draft from.
# (With a restricted draft head the hook sees them scattered to V, -inf outside the draft vocabulary.)
DraftLogitsFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class _State:
    """Decoding state; every tensor keeps a batch dimension so the state could grow to batch > 1.

    Attributes:
        caches: one cache per segment (see the module docstring).
        committed: (B, n) prompt + generated ids; the last one is in no cache yet.
        pending_ids: (B, m) ids whose draft shallow step is still to run (scope "draft").
        pending_hidden: (B, m, d) draft-path shallow states the adapter has not seen yet (shared scope).
    """

    caches: dict[str, DynamicCache]
    committed: torch.Tensor
    pending_ids: torch.Tensor
    pending_hidden: torch.Tensor


class SelfSpeculativeDecoder:
    """Kangaroo self-speculative decoding on a :class:`KangarooModel` (batch size 1).

    The output is that of the verifying model (DESIGN.md §2: the untouched base for ``lora_scope="draft"``
    or without LoRA, the LoRA model for ``"shared"``): token-identical to its greedy decoding, or
    distributed exactly like its sampling.

    Args:
        model: the model, in eval mode.
        threshold: a draft whose top-1 probability is below this ends the round (0: always draft
            ``max_draft``; >= 1: draft exactly one).
        max_draft: most tokens drafted per round (>= 1).
        draft_logits_fn: test hook; rewrites the (B, V) draft logits of the token at a given absolute
            position before the draft token (and its confidence) is chosen from them.
        on_round: debug hook called with a :class:`RoundInfo` after the prefill and after every round.
        prompt_lookup: most tokens a round drafts by prompt lookup when the context's last n-gram
            occurred before (0: off, the adapter drafts every round). ``prompt_lookup + 1 <= 8`` keeps
            verification within :mod:`kangaroo_lit.streaming_linear`'s rows.
        prompt_lookup_ngram: ``(min, max)`` n-gram sizes matched (the longest match wins).
    """

    def __init__(
        self,
        model: KangarooModel,
        threshold: float = 0.6,
        max_draft: int = 6,
        draft_logits_fn: DraftLogitsFn | None = None,
        on_round: Callable[[RoundInfo], None] | None = None,
        prompt_lookup: int = 0,
        prompt_lookup_ngram: tuple[int, int] = (2, 3),
    ) -> None:
        if prompt_lookup < 0:
            raise ValueError(f"prompt_lookup must be >= 0 (tokens; 0 = off), got {prompt_lookup}")
        if not 1 <= prompt_lookup_ngram[0] <= prompt_lookup_ngram[1]:
            raise ValueError(f"prompt_lookup_ngram must be (min, max) with 1 <= min <= max, got {prompt_lookup_ngram}")
        if max_draft < 1:
            raise ValueError(f"max_draft must be >= 1, got {max_draft}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.model = model
        self.threshold = threshold
        self.max_draft = max_draft
        self.draft_logits_fn = draft_logits_fn
        self.on_round = on_round
        self.prompt_lookup = prompt_lookup
        self.prompt_lookup_ngram = tuple(prompt_lookup_ngram)

    # ----------------------------------------------------------------------------------------------
    # Segments
    @property
    def _shallow_layers(self) -> range:
        return range(self.model.exit_layer + 1)

    @property
    def _deep_layers(self) -> range:
        return range(self.model.exit_layer + 1, self.model.num_layers)

    def _segment_layers(self, name: str) -> range:
        return {
            "draft_shallow": self._shallow_layers,
            "verify_shallow": self._shallow_layers,
            "deep": self._deep_layers,
            "adapter": range(1),
        }[name]

    def _positions(self, start: int, length: int, batch: int, device: torch.device) -> torch.Tensor:
        """(B, length) absolute positions ``start..start+length-1`` (no padding at batch size 1)."""
        return torch.arange(start, start + length, device=device).expand(batch, length)

    # ----------------------------------------------------------------------------------------------
    # Overridable steps
    def accept_drafts(
        self,
        draft_tokens: torch.Tensor,
        draft_probs: torch.Tensor | None,
        target_logits: torch.Tensor,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> tuple[int, int]:
        """Decide how many drafts to keep and the full model's token that follows them (one sequence).

        Args:
            draft_tokens: (k,) drafted ids.
            draft_probs: (k, V) warped draft distributions the drafts were sampled from (None if greedy).
            target_logits: (k + 1, V) full-model logits at ``x, d1..dk``.

        Returns:
            ``(n_accepted, next_token)``.
        """
        if sampling.greedy:
            target = target_logits.argmax(dim=-1).tolist()
            drafts = draft_tokens.tolist()
            n = 0
            while n < len(drafts) and drafts[n] == target[n]:
                n += 1
            return n, target[n]
        return rejection_sample(draft_tokens, draft_probs, probabilities(target_logits, sampling), generator)

    # ----------------------------------------------------------------------------------------------
    # Decoding
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | list[int] | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
    ) -> DecodeResult:
        """Generate up to ``max_new_tokens`` tokens after a prompt.

        Args:
            input_ids: (1, T) prompt ids, T >= 1.
            max_new_tokens: most tokens to generate (>= 1).
            eos_token_id: stop after generating this token (or any of these); it is part of the output.
            temperature: 0 for greedy decoding, else speculative sampling at this temperature.
            top_p: nucleus sampling mass (sampling only).
            top_k: top-k sampling (sampling only, 0 = off).
            generator: random generator on the model's device (sampling only).

        Returns:
            A :class:`DecodeResult`.
        """
        model = self.model
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        input_ids = check_inputs(model, input_ids, max_new_tokens)
        eos = eos_set(eos_token_id)
        device = input_ids.device
        result = DecodeResult()
        with torch.inference_mode():
            synchronize(device)
            start = time.perf_counter()
            state = self._prefill(input_ids, sampling, generator, result, eos, max_new_tokens)
            index = 1
            while not _finished(result, eos, max_new_tokens):
                self._round(state, index, sampling, generator, result, eos, max_new_tokens)
                index += 1
            synchronize(device)
            result.wall_time_s = time.perf_counter() - start
        return result

    def _prefill(self, input_ids, sampling, generator, result, eos, max_new_tokens) -> _State:
        """The prompt through the full path, filling every cache; the first token from its last logits."""
        model = self.model
        batch, length = input_ids.shape
        positions = self._positions(0, length, batch, input_ids.device)
        caches = {"draft_shallow": DynamicCache(), "deep": DynamicCache(), "adapter": DynamicCache()}
        if not model.shallow_is_shared:
            caches["verify_shallow"] = DynamicCache()
        embeds = model.embed(input_ids)
        draft_hidden = model.shallow(embeds, positions, cache=caches["draft_shallow"], draft=True)
        if model.shallow_is_shared:
            verify_hidden = draft_hidden
        else:
            verify_hidden = model.shallow(embeds, positions, cache=caches["verify_shallow"], draft=False)
        # Deep layers over the whole prompt (their cache needs it) but the head on the last position
        # only, as HF generate does: the prompt's other logits are never used.
        deep = model.run_layers(verify_hidden, model.exit_layer + 1, model.num_layers, positions, cache=caches["deep"])
        logits = model.causal_lm.lm_head(model.causal_lm.model.norm(deep[:, -1:]))[:, -1]
        # The adapter sees the prompt too (no exit head: the first token is the full model's).
        model.adapter_hidden(draft_hidden, positions, cache=caches["adapter"])
        first, _ = choose(logits, sampling, generator)
        state = _State(
            caches=caches,
            committed=torch.cat([input_ids, first[:, None]], dim=1),
            pending_ids=input_ids[:, :0],
            pending_hidden=draft_hidden[:, :0],
        )
        result.full_passes += 1
        emitted = self._emit([int(first[0])], result, eos, max_new_tokens)
        self._report(state, 0, [], 0, emitted)
        return state

    def _draft_step(self, state: _State, token: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft-path step for ``token`` at ``position`` (plus any pending position before it).

        Args:
            token: (B, 1) id.
            position: its absolute position.

        Returns:
            ``(hidden, logits)``: (B, 1, d) its draft-path shallow state and (B, V) the draft logits of
            the token after it ((B, K) over ``model.draft_vocab`` with a restricted draft head).
        """
        model = self.model
        batch = token.shape[0]
        ids = torch.cat([state.pending_ids, token], dim=1)
        shallow = model.shallow(
            model.embed(ids),
            self._positions(position - ids.shape[1] + 1, ids.shape[1], batch, token.device),
            cache=state.caches["draft_shallow"],
            draft=True,
        )
        adapter_in = torch.cat([state.pending_hidden, shallow], dim=1)
        logits = model.draft_logits(
            adapter_in,
            self._positions(position - adapter_in.shape[1] + 1, adapter_in.shape[1], batch, token.device),
            cache=state.caches["adapter"],
        )[:, -1]
        state.pending_ids = state.pending_ids[:, :0]
        state.pending_hidden = state.pending_hidden[:, :0]
        return shallow[:, -1:], logits

    def _round(self, state, index, sampling, generator, result, eos, max_new_tokens) -> None:
        model = self.model
        batch, n = state.committed.shape
        device = state.committed.device
        x = state.committed[:, -1:]
        x_pos = n - 1
        # Drafting past the token budget is wasted work (and could run past the position limit): a round
        # yields at most k + 1 tokens, so k <= remaining - 1, but a round always drafts at least one.
        remaining = max_new_tokens - len(result.tokens)
        k_max = max(1, min(self.max_draft, remaining - 1))
        if self.prompt_lookup:
            copied = lookup_continuation(state.committed[0], max(1, min(self.prompt_lookup, remaining - 1)),
                                         *self.prompt_lookup_ngram)
            if copied.numel():
                self._lookup_round(state, index, copied[None], sampling, generator, result, eos, max_new_tokens)
                return

        # 1. Draft.
        shallow_states, drafts, draft_probs = [], [], []
        token = x
        for i in range(1, k_max + 1):
            hidden, logits = self._draft_step(state, token, x_pos + i - 1)
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
            drafts.append(draft)
            draft_probs.append(probs)
            result.draft_steps += 1
            token = draft[:, None]
            if i == k_max or self.threshold >= 1:
                break
            if self.threshold > 0:
                # Second early exit. Greedy: confidence of the draft distribution at temperature 1;
                # sampling: the top probability of the (warped) distribution the draft came from.
                conf_probs = logits.float().softmax(dim=-1) if probs is None else probs
                if float(conf_probs.max(dim=-1).values[0]) < self.threshold:
                    break
        k = len(drafts)
        draft_ids = torch.stack(drafts, dim=1)  # (B, k)

        # 2. Verify: one pass of the full model over [x, d1..dk] at positions x_pos..x_pos+k.
        positions = self._positions(x_pos, k + 1, batch, device)
        if model.shallow_is_shared:
            # dk's shallow state: one more shallow step (it also serves the next round if dk is accepted).
            last = model.shallow(
                model.embed(draft_ids[:, -1:]), positions[:, -1:], cache=state.caches["draft_shallow"], draft=True
            )
            verify_hidden = torch.cat([*shallow_states, last], dim=1)
        else:
            last = None
            verify_hidden = model.shallow(
                model.embed(torch.cat([x, draft_ids], dim=1)),
                positions,
                cache=state.caches["verify_shallow"],
                draft=False,
            )
        target_logits = model.deep_logits(verify_hidden, positions, cache=state.caches["deep"])
        result.full_passes += 1
        result.drafted += k

        # 3. Accept.
        q = None if sampling.greedy else torch.cat(draft_probs, dim=0)
        n_accepted, next_token = self.accept_drafts(draft_ids[0], q, target_logits[0], sampling, generator)
        result.accepted += n_accepted
        new = draft_ids[0, :n_accepted].tolist() + [next_token]

        # 4. Roll back: every cache keeps x, d1..d_accepted (the next round's x is next_token).
        keep = n + n_accepted
        for name in ("deep", "verify_shallow"):
            if name in state.caches:
                crop_layers(state.caches[name], self._segment_layers(name), keep)
        if n_accepted < k:
            crop_layers(state.caches["draft_shallow"], self._shallow_layers, keep)
            crop_layers(state.caches["adapter"], range(1), keep)
        elif model.shallow_is_shared:
            # All accepted: the shallow cache already holds dk (verify step); the adapter gets its state
            # together with the next round's first draft step.
            state.pending_hidden = last
        else:
            # All accepted, scope "draft": dk has not been through the LoRA shallow layers either.
            state.pending_ids = draft_ids[:, -1:]

        next_ids = torch.tensor([new], dtype=state.committed.dtype, device=device)
        state.committed = torch.cat([state.committed, next_ids], dim=1)
        emitted = self._emit(new, result, eos, max_new_tokens)
        self._report(state, index, draft_ids[0].tolist(), n_accepted, emitted)

    def _lookup_round(self, state, index, draft_ids, sampling, generator, result, eos, max_new_tokens) -> None:
        """A round whose (B, k) drafts were copied from the context: verify them; the draft path catches up later."""
        model = self.model
        batch, n = state.committed.shape
        device = state.committed.device
        x = state.committed[:, -1:]
        k = draft_ids.shape[1]
        positions = self._positions(n - 1, k + 1, batch, device)
        ids = torch.cat([x, draft_ids], dim=1)
        # The shared shallow cache is the draft path's: these positions enter it now (its pending ids are
        # none); scope "draft" runs the untouched shallow layers on their own cache, as every round does.
        segment = "draft_shallow" if model.shallow_is_shared else "verify_shallow"
        verify_hidden = model.shallow(model.embed(ids), positions, cache=state.caches[segment],
                                      draft=model.shallow_is_shared)
        target_logits = model.deep_logits(verify_hidden, positions, cache=state.caches["deep"])
        result.full_passes += 1
        result.drafted += k
        result.lookup_drafted += k

        # A copied token is a draft from a point mass q (sampling: accepted with probability p(d)).
        q = None
        if not sampling.greedy:
            q = torch.zeros(k, target_logits.shape[-1], dtype=target_logits.dtype, device=device)
            q.scatter_(1, draft_ids[0].view(k, 1), 1.0)
        n_accepted, next_token = self.accept_drafts(draft_ids[0], q, target_logits[0], sampling, generator)
        result.accepted += n_accepted
        result.lookup_accepted += n_accepted
        new = draft_ids[0, :n_accepted].tolist() + [next_token]

        keep = n + n_accepted
        for name in ("deep", segment):
            crop_layers(state.caches[name], self._segment_layers(name), keep)
        # x and the accepted copies wait for the draft path (the adapter; scope "draft": its shallow layers too).
        if model.shallow_is_shared:
            state.pending_hidden = torch.cat([state.pending_hidden, verify_hidden[:, : n_accepted + 1]], dim=1)
        else:
            state.pending_ids = torch.cat([state.pending_ids, ids[:, : n_accepted + 1]], dim=1)

        next_ids = torch.tensor([new], dtype=state.committed.dtype, device=device)
        state.committed = torch.cat([state.committed, next_ids], dim=1)
        emitted = self._emit(new, result, eos, max_new_tokens)
        self._report(state, index, draft_ids[0].tolist(), n_accepted, emitted, lookup=True)

    def _emit(self, new: list[int], result: DecodeResult, eos: set[int], max_new_tokens: int) -> list[int]:
        """Append one pass's tokens to the output, cut after EOS or at the budget; record the pass."""
        emitted = []
        for tok in new:
            if len(result.tokens) >= max_new_tokens:
                break
            result.tokens.append(tok)
            emitted.append(tok)
            if tok in eos:
                break
        result.accept_lengths.append(len(emitted))
        return emitted

    def _report(self, state: _State, index: int, drafted: list[int], accepted: int, emitted: list[int],
                lookup: bool = False) -> None:
        if self.on_round is None:
            return
        lengths = {
            name: [cache_length(cache, i) for i in self._segment_layers(name)] for name, cache in state.caches.items()
        }
        # A pending id has been through neither the draft shallow layers nor the adapter.
        pending = {
            "draft_shallow": state.pending_ids.shape[1],
            "adapter": state.pending_ids.shape[1] + state.pending_hidden.shape[1],
        }
        self.on_round(
            RoundInfo(
                index=index,
                drafted=drafted,
                accepted=accepted,
                emitted=emitted,
                committed_length=state.committed.shape[1],
                cache_lengths=lengths,
                pending=pending,
                lookup=lookup,
            )
        )


def _finished(result: DecodeResult, eos: set[int], max_new_tokens: int) -> bool:
    return len(result.tokens) >= max_new_tokens or (bool(result.tokens) and result.tokens[-1] in eos)
