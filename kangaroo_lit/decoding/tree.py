"""Tree drafting: several candidates per draft position, sized by the cost model, verified in one pass.

A chain bets a round on the draft's top-1 token at each position; a tree also offers its runners-up,
and the verification pass checks every branch at once (a tree attention mask: each node sees the
context, ``x`` and its own ancestors). The shape follows the draft's confidence, as in EAGLE-2:

1. The draft path takes ``x`` (one step, as for a chain) and scores the root's top-``width`` tokens.
2. Each further level expands the ``width`` best nodes so far by *score*, the product of the draft
   probabilities along a node's path (the draft's estimate that the whole path is accepted), in one
   draft-path pass over those nodes; each gets its top-``width`` children. Expansion stops at
   ``max_depth``, or when one level of lookahead (each frontier node's best child guessed as likely
   as the node itself was) does not raise the expected rate of step 3 by more than the step costs.
3. The verified tree is the best ``N`` nodes by score (ancestors always included), ``N`` chosen to
   maximise expected tokens per unit of time: ``(1 + sum of their scores) / (draft time + v_{N+1})``
   with ``c`` and ``v_k`` from the cost model (:mod:`~kangaroo_lit.decoding.cost`); ``N = 0`` makes the
   round a plain step. ``max_nodes`` caps ``N`` (the streaming kernel verifies at most 7 nodes + ``x``).

Scores use the draft's calibrated confidence (``model.confidence_temperature``) when greedy, the warped
distribution when sampling: with a calibrated draft a score is an acceptance probability, and the sum
of the scores the expected number of accepted tokens. The decoder's walk down the tree
(:meth:`SelfSpeculativeDecoder.accept_tree`) keeps greedy decoding identical and sampling exact.

The expansion's draft-path states are not kept: at the end of :meth:`TreeDrafter.propose` the draft
caches are rolled back to ``x``, and the accepted tokens enter the draft path with the next round's
first step (as copied tokens do), which costs about one step's time for a handful of positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kangaroo_lit.decoding.cost import DecodeCost
from kangaroo_lit.decoding.drafters import DecodingState, Drafter, DraftLogitsFn, Proposal, draft_path_step
from kangaroo_lit.decoding.kv_cache import cache_length, crop_layers
from kangaroo_lit.decoding.sampling import SamplingConfig, probabilities
from kangaroo_lit.masks import TreeMask


@dataclass
class _Node:
    token: int
    parent: int  # index into the candidate list, -1 for the root x
    depth: int
    prob: float  # its draft probability given its parent
    score: float  # the product of ``prob`` along its path
    ancestors: frozenset[int]  # candidate indices of its ancestors and itself


class TreeDrafter(Drafter):
    """Draft a token tree from the adapter, shaped by its confidence and sized by the cost model.

    Args:
        cost: ``c`` and ``v_k`` of the device (:class:`~kangaroo_lit.decoding.cost.DecodeCost`).
        width: candidates per expanded node, and nodes expanded per level (>= 1; 1 = a chain).
        max_nodes: most nodes verified per round (>= 1), ``x`` not counted.
        max_depth: most levels below ``x`` (>= 1).
        draft_logits_fn: test hook, see :data:`~kangaroo_lit.decoding.drafters.DraftLogitsFn`.
    """

    def __init__(self, cost: DecodeCost, width: int = 4, max_nodes: int = 7, max_depth: int = 6,
                 draft_logits_fn: DraftLogitsFn | None = None):
        for name, value in (("tree_width", width), ("tree_nodes", max_nodes), ("tree_depth", max_depth)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.cost = cost
        self.width = width
        self.max_nodes = max_nodes
        self.max_depth = max_depth
        self.draft_logits_fn = draft_logits_fn

    def propose(self, model, state, budget, sampling, generator) -> Proposal:
        del generator  # candidates are chosen, not sampled
        x_pos = state.committed.shape[1] - 1
        hidden, logits = draft_path_step(model, state, state.committed[:, -1:], x_pos)
        steps = 1
        nodes: list[_Node] = []
        frontier = self._children(model, logits, [-1], [x_pos + 1], nodes, sampling)
        cached: list[int] = []  # candidate indices whose draft-path states follow x in the draft caches
        max_depth = min(self.max_depth, budget)
        for depth in range(2, max_depth + 1):
            if not self._worth_expanding(nodes, frontier, steps):
                break
            logits = self._expand(model, state, x_pos, frontier, cached, nodes)
            steps += 1
            cached.extend(frontier)
            children = self._children(model, logits, frontier, [x_pos + depth] * len(frontier), nodes, sampling)
            frontier = sorted(children, key=lambda i: -nodes[i].score)[: self.width]
        # Roll the draft path back to x: the expansion's states are not kept (module docstring).
        for name, layers in (("draft_shallow", range(model.exit_layer + 1)), ("adapter", range(1))):
            crop_layers(state.caches[name], layers, min(cache_length(state.caches[name], 0), x_pos + 1))
        chosen = self._select(nodes, steps)
        shallow = hidden if model.shallow_is_shared else None
        if not chosen:
            return Proposal(tokens=state.committed[:, :0], probs=None, shallow=shallow, source="tree",
                            draft_steps=steps)
        order = sorted(chosen, key=lambda i: (nodes[i].depth, chosen.index(i)))
        where = {node: j for j, node in enumerate(order)}
        tokens = torch.tensor([[nodes[i].token for i in order]], dtype=state.committed.dtype,
                              device=state.committed.device)
        parents = [-1 if nodes[i].parent < 0 else where[nodes[i].parent] for i in order]
        return Proposal(tokens=tokens, probs=None, shallow=shallow, source="tree", draft_steps=steps,
                        parents=parents)

    def _children(self, model, logits: torch.Tensor, parents: list[int], positions: list[int], nodes: list[_Node],
                  sampling: SamplingConfig) -> list[int]:
        """Add the top-``width`` children of each parent (row of ``logits``) to ``nodes``; their indices.

        Args:
            logits: (P, V) draft logits after each parent ((P, K) with a restricted draft head).
            parents: P candidate indices (-1: the root).
            positions: the absolute position of each parent's children.
        """
        if self.draft_logits_fn is not None:
            logits = torch.cat([self.draft_logits_fn(model.scatter_draft(row[None], float("-inf")), pos)
                                for row, pos in zip(logits, positions)])
        if sampling.greedy:
            temperature = float(getattr(model, "confidence_temperature", 1.0))
            probs = (logits.double() / temperature).softmax(dim=-1)
        else:
            probs = probabilities(logits.double(), sampling)
        top = probs.topk(min(self.width, probs.shape[-1]), dim=-1)
        ids = top.indices if self.draft_logits_fn is not None else model.draft_token_ids(top.indices)
        added = []
        for row, parent in enumerate(parents):
            base = 1.0 if parent < 0 else nodes[parent].score
            lineage = frozenset() if parent < 0 else nodes[parent].ancestors
            depth = 1 if parent < 0 else nodes[parent].depth + 1
            for prob, token in zip(top.values[row].tolist(), ids[row].tolist()):
                if prob <= 0:
                    continue  # outside the warped support: cannot be accepted
                index = len(nodes)
                nodes.append(_Node(int(token), parent, depth, prob, base * prob, lineage | {index}))
                added.append(index)
        return added

    @staticmethod
    def _expand(model, state: DecodingState, x_pos: int, frontier: list[int], cached: list[int],
                nodes: list[_Node]) -> torch.Tensor:
        """One draft-path pass over the ``frontier`` nodes; (F, V) their draft logits ((F, K) restricted).

        The draft caches hold the context through ``x`` and then the ``cached`` nodes, in that order; a
        frontier node attends to the context, ``x``, its cached ancestors and itself.
        """
        device = state.committed.device
        keys = cached + frontier
        allowed = torch.tensor([[k in nodes[q].ancestors for k in keys] for q in frontier], dtype=torch.bool,
                               device=device)
        allowed = torch.cat([torch.ones(len(frontier), x_pos + 1, dtype=torch.bool, device=device), allowed], dim=1)
        query_positions = torch.tensor([x_pos + nodes[q].depth for q in frontier], device=device)
        key_positions = torch.cat([torch.arange(x_pos + 1, device=device),
                                   torch.tensor([x_pos + nodes[k].depth for k in keys], device=device)])
        mask = TreeMask(allowed=allowed, query_positions=query_positions, key_positions=key_positions)
        ids = torch.tensor([[nodes[q].token for q in frontier]], dtype=state.committed.dtype, device=device)
        where = query_positions[None]
        shallow = model.shallow(model.embed(ids), where, cache=state.caches["draft_shallow"], draft=True, tree=mask)
        return model.draft_logits(shallow, where, cache=state.caches["adapter"], tree=mask)[0]

    def _worth_expanding(self, nodes: list[_Node], frontier: list[int], steps: int) -> bool:
        """One level of lookahead: does the best expected rate rise if the frontier is expanded?

        A node's best child is guessed to be as likely as the node was given its parent (confidence
        persists along a path); the expansion costs one more draft step.
        """
        now = self._best(nodes, steps)[1]
        guesses = [_Node(-1, f, nodes[f].depth + 1, nodes[f].prob, nodes[f].score * nodes[f].prob, frozenset())
                   for f in frontier]
        return self._best(nodes + guesses, steps + 1)[1] > now

    def _select(self, nodes: list[_Node], steps: int) -> list[int]:
        """The nodes to verify: the best by score (ancestors first), as many as maximise the expected rate."""
        return self._best(nodes, steps)[0]

    def _best(self, nodes: list[_Node], steps: int) -> tuple[list[int], float]:
        """The best tree of ``nodes`` after ``steps`` draft steps, and its expected rate (tokens per step).

        Expected tokens of a round verifying the first ``N`` nodes by score: ``1 + sum(scores)`` (the full
        model's own token plus each node's chance of being accepted); its time: ``steps * c + v_{N+1}``.
        """
        ranked = sorted(range(len(nodes)), key=lambda i: (-nodes[i].score, nodes[i].depth))
        picked: list[int] = []
        taken: set[int] = set()
        for i in ranked:
            if len(picked) == self.max_nodes:
                break
            if nodes[i].parent < 0 or nodes[i].parent in taken:
                picked.append(i)
                taken.add(i)
        spent = steps * self.cost.draft_step
        best_n, best_rate, expected = 0, 1.0 / (spent + self.cost.verify_cost(1)), 1.0
        for n, i in enumerate(picked, start=1):
            expected += nodes[i].score
            rate = expected / (spent + self.cost.verify_cost(n + 1))
            if rate > best_rate:
                best_n, best_rate = n, rate
        return picked[:best_n], best_rate
