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

Where the drafts come from is a :class:`~kangaroo_lit.decoding.drafters.Drafter`: the adapter (steps 1
above), prompt lookup (a round whose last committed n-gram occurred earlier in the context drafts the
tokens that followed it; no match: a plain one-token step), or lookup where it matches and the adapter
otherwise. Verification, acceptance, rollback and emission are written once here for all of them.
Copied tokens have not been through the draft path, so they join the *pending* tokens (below) that
enter it with the next adapter round's first step. Sampling stays exact: a copied token is a draft from
a point mass ``q`` (accepted with probability ``p(d)``, else resampled from ``p`` without ``d``).

A drafter may propose a *tree* instead of a chain (:class:`~kangaroo_lit.decoding.tree.TreeDrafter`):
verification then runs over ``x`` and every node with a tree attention mask (a node sees the context,
``x`` and its ancestors, at position ``x``'s + its depth), :meth:`SelfSpeculativeDecoder.accept_tree`
walks down from ``x`` choosing the full model's token at each node (argmax, or a sample of ``p``) and
following the child that carries it, and the accepted path is packed right after ``x`` in the verifier's
caches (:func:`~kangaroo_lit.decoding.kv_cache.keep_positions`) before the chain's rollback. A tree's
"drafted" tokens are all its nodes, so its acceptance rate (accepted / drafted) reads lower than a chain's
for the same tokens per pass; MAT compares them.

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
from kangaroo_lit.decoding.drafters import DecodingState, Drafter, DraftLogitsFn, Proposal, make_drafter, positions
from kangaroo_lit.decoding.kv_cache import cache_length, crop_layers, keep_positions
from kangaroo_lit.decoding.result import DecodeResult
from kangaroo_lit.decoding.sampling import SamplingConfig, choose, probabilities, rejection_sample
from kangaroo_lit.masks import tree_pass_mask
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
        parents: for a tree round, each drafted token's parent index (-1: ``x``); None for a chain.
        path: for a tree round, the accepted nodes' indices into ``drafted``, root to leaf.
    """

    index: int
    drafted: list[int]
    accepted: int
    emitted: list[int]
    committed_length: int
    cache_lengths: dict[str, list[int]]
    pending: dict[str, int]
    lookup: bool = False
    parents: list[int] | None = None
    path: list[int] | None = None


class SelfSpeculativeDecoder:
    """Kangaroo self-speculative decoding on a :class:`KangarooModel` (batch size 1).

    The output is that of the verifying model (DESIGN.md §2: the untouched base for ``lora_scope="draft"``
    or without LoRA, the LoRA model for ``"shared"``): token-identical to its greedy decoding, or
    distributed exactly like its sampling, whatever the drafter.

    Args:
        model: the model, in eval mode.
        threshold: a draft whose top-1 probability is below this ends the round, in [0, 1] (0: always
            draft ``max_draft``; 1: draft exactly one).
        max_draft: most tokens drafted per round (>= 1).
        draft_logits_fn: test hook; rewrites the (B, V) draft logits of the token at a given absolute
            position before the draft token (and its confidence) is chosen from them.
        on_round: debug hook called with a :class:`RoundInfo` after the prefill and after every round.
        prompt_lookup: most tokens a round drafts by prompt lookup when the context's last n-gram
            occurred before (0: off, the adapter drafts every round).
        prompt_lookup_ngram: ``(min, max)`` n-gram sizes matched (the longest match wins).
        drafter: where drafts come from, a :class:`~kangaroo_lit.decoding.drafters.Drafter`; default
            (None) is built from the arguments above by :func:`~kangaroo_lit.decoding.drafters.make_drafter`.
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
        drafter: Drafter | None = None,
    ) -> None:
        self.model = model
        self.on_round = on_round
        self.drafter = drafter or make_drafter("adapter", threshold, max_draft, prompt_lookup,
                                               tuple(prompt_lookup_ngram), draft_logits_fn)

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

    def accept_tree(
        self,
        proposal: Proposal,
        target_logits: torch.Tensor,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> tuple[list[int], int]:
        """Walk a draft tree from ``x``: the accepted path of nodes and the full model's token after it.

        At each node the full model's token is chosen from its own distribution there (argmax, or a
        sample of the warped ``p``); if a child carries that token the walk moves to it, else that token
        ends the round. Every committed token is therefore exactly the full model's choice given the
        tokens before it: greedy-identical, and for sampling distributed exactly as ``p`` (the
        candidates are chosen, not sampled, so this is multi-candidate rejection with point-mass drafts:
        a candidate is accepted with probability ``p`` of its token, the most any rule can give).

        Args:
            proposal: a tree proposal (``parents`` set).
            target_logits: (k + 1, V) full-model logits at ``x`` and at each node.

        Returns:
            ``(path, next_token)``: the accepted node indices, root to leaf, and the token that follows.
        """
        children: dict[int, dict[int, int]] = {}
        for index, (token, parent) in enumerate(zip(proposal.tokens[0].tolist(), proposal.parents)):
            children.setdefault(parent, {}).setdefault(token, index)
        path, node = [], -1
        while True:
            token = int(choose(target_logits[node + 1 : node + 2], sampling, generator)[0][0])
            child = children.get(node, {}).get(token)
            if child is None:
                return path, token
            path.append(child)
            node = child

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
        self.drafter.start()
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

    def _prefill(self, input_ids, sampling, generator, result, eos, max_new_tokens) -> DecodingState:
        """The prompt through the full path, filling every cache; the first token from its last logits."""
        model = self.model
        batch, length = input_ids.shape
        where = positions(0, length, batch, input_ids.device)
        caches = {"draft_shallow": DynamicCache(), "deep": DynamicCache(), "adapter": DynamicCache()}
        if not model.shallow_is_shared:
            caches["verify_shallow"] = DynamicCache()
        embeds = model.embed(input_ids)
        draft_hidden = model.shallow(embeds, where, cache=caches["draft_shallow"], draft=True)
        if model.shallow_is_shared:
            verify_hidden = draft_hidden
        else:
            verify_hidden = model.shallow(embeds, where, cache=caches["verify_shallow"], draft=False)
        # Deep layers over the whole prompt (their cache needs it) but the head on the last position
        # only, as HF generate does: the prompt's other logits are never used.
        deep = model.run_layers(verify_hidden, model.exit_layer + 1, model.num_layers, where, cache=caches["deep"])
        logits = model.causal_lm.lm_head(model.causal_lm.model.norm(deep[:, -1:]))[:, -1]
        # The adapter sees the prompt too (no exit head: the first token is the full model's).
        model.adapter_hidden(draft_hidden, where, cache=caches["adapter"])
        first, _ = choose(logits, sampling, generator)
        state = DecodingState(
            caches=caches,
            committed=torch.cat([input_ids, first[:, None]], dim=1),
            pending_ids=input_ids[:, :0],
            pending_hidden=draft_hidden[:, :0],
        )
        result.full_passes += 1
        emitted = self._emit([int(first[0])], result, eos, max_new_tokens)
        self._report(state, 0, [], 0, emitted)
        return state

    def _round(self, state: DecodingState, index, sampling, generator, result, eos, max_new_tokens) -> None:
        """One round: draft, verify, accept, roll back, commit, emit, report."""
        # A round yields at most k + 1 tokens, so drafting past k = remaining - 1 is wasted work (and
        # could run past the position limit); a drafter may still propose one.
        budget = max(1, max_new_tokens - len(result.tokens) - 1)
        proposal = self.drafter.propose(self.model, state, budget, sampling, generator)
        result.draft_steps += proposal.draft_steps
        target_logits, verify_hidden = self._verify(state, proposal)
        result.full_passes += 1
        path = None
        if proposal.is_tree:
            path, next_token = self.accept_tree(proposal, target_logits[0], sampling, generator)
            n_accepted = len(path)
            # Pack the accepted path right after x in the verifier's caches (and its states), so the
            # rest of the round is the chain's: the caches then hold x, the path, then what is cropped.
            self._keep_path(state, path)
            verify_hidden = verify_hidden[:, [0, *(1 + i for i in path)]]
            accepted_tokens = proposal.tokens[0, path].tolist()
        else:
            n_accepted, next_token = self.accept_drafts(
                proposal.tokens[0], self._draft_probs(proposal, target_logits, sampling), target_logits[0],
                sampling, generator,
            )
            accepted_tokens = proposal.tokens[0, :n_accepted].tolist()
        self.drafter.update(proposal, n_accepted)
        k = proposal.size
        result.drafted += k
        result.round_drafted.append(k)
        result.accepted += n_accepted
        if proposal.source == "lookup":
            result.lookup_drafted += k
            result.lookup_accepted += n_accepted
        new = accepted_tokens + [next_token]
        self._commit(state, new, verify_hidden)
        emitted = self._emit(new, result, eos, max_new_tokens)
        self._report(state, index, proposal.tokens[0].tolist(), n_accepted, emitted, lookup=proposal.source == "lookup",
                     parents=proposal.parents, path=path)

    def _verify(self, state: DecodingState, proposal: Proposal) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the full model over ``[x, d1..dk]`` at positions ``n-1..n-1+k``.

        Returns:
            ``(target_logits, verify_hidden)``: (B, k + 1, V) the full model's logits at each position
            and (B, k + 1, d) the verifier's shallow states (the draft path's, when they are shared).
        """
        model = self.model
        batch, n = state.committed.shape
        ids = torch.cat([state.committed[:, -1:], proposal.tokens], dim=1)
        j = 0 if proposal.shallow is None else proposal.shallow.shape[1]
        if proposal.is_tree:
            # Nodes at x's position + their depth, each attending to the context, x and its ancestors.
            if j > 1:
                raise ValueError("a tree proposal carries the shallow state of x at most")
            tree = tree_pass_mask(proposal.parents, n - 1, device=ids.device)
            where = tree.query_positions.expand(batch, -1)
            shallow_tree = tree_pass_mask(proposal.parents, n - 1, first=j, device=ids.device)
        else:
            tree = shallow_tree = None
            where = positions(n - 1, ids.shape[1], batch, ids.device)
        if model.shallow_is_shared:
            # The shared shallow cache is the draft path's: positions drafting already ran there are
            # reused, the rest (the adapter's dk, or every copied token) run now and enter it.
            if j == ids.shape[1]:  # every position has been through the shallow layers already
                verify_hidden = proposal.shallow
            else:
                rest = model.shallow(model.embed(ids[:, j:]), where[:, j:], cache=state.caches["draft_shallow"],
                                     draft=True, tree=shallow_tree)
                verify_hidden = rest if proposal.shallow is None else torch.cat([proposal.shallow, rest], dim=1)
        else:
            # Scope "draft": the untouched shallow layers, on their own cache.
            verify_hidden = model.shallow(model.embed(ids), where, cache=state.caches["verify_shallow"], draft=False,
                                          tree=tree)
        return model.deep_logits(verify_hidden, where, cache=state.caches["deep"], tree=tree), verify_hidden

    def _keep_path(self, state: DecodingState, path: list[int]) -> None:
        """After a tree pass: keep x and the accepted ``path`` (node indices) in the verifier's caches."""
        x_pos = state.committed.shape[1] - 1
        keep_positions(state.caches["deep"], self._deep_layers, x_pos + 1, path)
        shallow = "draft_shallow" if self.model.shallow_is_shared else "verify_shallow"
        keep_positions(state.caches[shallow], self._shallow_layers, x_pos + 1, path)

    @staticmethod
    def _draft_probs(proposal: Proposal, target_logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor | None:
        """(k, V) ``q`` for the rejection step (None for greedy); copied tokens are point masses."""
        if sampling.greedy or proposal.probs is not None:
            return proposal.probs
        k = proposal.size
        q = torch.zeros(k, target_logits.shape[-1], dtype=target_logits.dtype, device=target_logits.device)
        return q.scatter_(1, proposal.tokens[0].view(k, 1), 1.0)

    def _commit(self, state: DecodingState, new: list[int], verify_hidden: torch.Tensor) -> None:
        """Append the round's tokens and roll every cache back to what they must hold.

        With ``n`` tokens committed before the round and ``a = len(new) - 1`` drafts accepted, every
        cache must hold positions ``0..n+a-1`` (through the last accepted draft; the new last token is
        the next ``x``). Verification wrote ``[x, d1..dk]`` to ``deep`` and the verifier's shallow cache:
        crop them. The draft path holds what drafting ran (nothing for copied tokens): crop it where it
        is ahead, and what it lacks becomes pending, taken in by the next adapter step.
        """
        model = self.model
        n = state.committed.shape[1]
        keep = n + len(new) - 1
        state.committed = torch.cat([state.committed, state.committed.new_tensor([new])], dim=1)
        crop_layers(state.caches["deep"], self._deep_layers, keep)
        if model.shallow_is_shared:
            crop_layers(state.caches["draft_shallow"], self._shallow_layers, keep)
        else:
            crop_layers(state.caches["verify_shallow"], self._shallow_layers, keep)
        if not self.drafter.uses_draft_path:
            # Nothing will ever take pending positions in: keeping them would only grow with the output.
            state.pending_ids, state.pending_hidden = state.committed[:, :0], verify_hidden[:, :0]
            return
        if not model.shallow_is_shared:
            seen = min(cache_length(state.caches["draft_shallow"], 0), keep)
            crop_layers(state.caches["draft_shallow"], self._shallow_layers, seen)
            state.pending_ids = state.committed[:, seen:keep]
        adapter_seen = min(cache_length(state.caches["adapter"], 0), keep)
        crop_layers(state.caches["adapter"], range(1), adapter_seen)
        if model.shallow_is_shared:
            # Positions adapter_seen..keep-1 wait for the adapter: those before x were pending already
            # (a drafter that skipped the draft path left them), the rest are this pass's shallow states.
            x_pos = n - 1
            if adapter_seen >= x_pos:
                state.pending_hidden = verify_hidden[:, adapter_seen - x_pos : keep - x_pos]
            else:
                state.pending_hidden = torch.cat([state.pending_hidden, verify_hidden[:, : keep - x_pos]], dim=1)

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

    def _report(self, state: DecodingState, index: int, drafted: list[int], accepted: int, emitted: list[int],
                lookup: bool = False, parents: list[int] | None = None, path: list[int] | None = None) -> None:
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
                parents=parents,
                path=path,
            )
        )


def _finished(result: DecodeResult, eos: set[int], max_new_tokens: int) -> bool:
    return len(result.tokens) >= max_new_tokens or (bool(result.tokens) and result.tokens[-1] in eos)
