"""The decoding methods Spec-Bench compares, each behind one call: a prompt in, a :class:`TurnResult` out.

All of them decode with the *same* verifying model (DESIGN §2: the untouched base, or the LoRA-merged
model with ``lora_scope: shared``), so under greedy decoding every method should produce the vanilla
loop's tokens:

==================  ===========================================================================
``vanilla``         :class:`~kangaroo_lit.decoding.VanillaDecoder`, the speed baseline
``generate``        HF ``generate`` (greedy or sampling), to show the baseline is not a slow one
``pld``             HF prompt lookup decoding: ``prompt_lookup_num_tokens=10``,
                    ``max_matching_ngram_size=3`` (Spec-Bench's PLD: ``draft_num_candidate_tokens=10``,
                    ``draft_matching_window_size=3``)
``pld7``            the same with 7 proposed tokens (8-row verification windows: within the
                    streaming kernel's limit, like ``--prompt_lookup 7``); only when asked for
``lookup``          prompt lookup alone in this project's decoder (no draft path; a round without a
                    match is a plain one-token step; ``--lookup_window cost``, the default, verifies
                    as many copied tokens as the cost model says pay): what ``kangaroo_lookup`` gains
                    over it is the draft's
``hf_early_exit``   HF's LayerSkip-style self-speculation, ``assistant_early_exit=L + 1``: the first
                    ``L + 1`` layers (``0..L``, our exit layer ``L``) + final norm + ``lm_head`` draft,
                    with the same drafting rule as Kangaroo (at most ``max_draft`` drafts, a round
                    ends at a draft whose probability is below ``threshold``:
                    ``num_assistant_tokens``, ``assistant_confidence_threshold``, schedule
                    ``constant``); it recomputes the shallow layers in verification (own caches)
``kangaroo``        :class:`~kangaroo_lit.decoding.SelfSpeculativeDecoder` with an exported draft
``early_exit``      the same decoder with an untrained adapter (``o_proj`` zero: final norm +
                    ``lm_head`` on ``hidden_states[L + 1]``), when no artifact is given
``kangaroo_lookup`` the trained draft plus prompt lookup: a round whose last n-gram occurred
                    earlier in the context copies what followed it (at most ``prompt_lookup``
                    tokens, sized as for ``lookup``), else the adapter drafts
                    (:mod:`kangaroo_lit.decoding.prompt_lookup`)
==================  ===========================================================================

What HF ``generate`` cannot report: the tokens each target pass produced (``accept_lengths``) are not
returned, so its answer lines carry ``accept_lengths: []``. A forward pre-hook on the model counts what
it can: ``decoding_steps`` = forward passes of the full model (the early-exit drafts, which run the
same module with fewer layers, are told apart by ``config.num_hidden_layers`` and counted as draft
passes), and ``drafted`` = tokens fed to those passes beyond one per pass and the prompt (the candidates
verified). Then MAT = new tokens / ``decoding_steps`` (as for every method: DESIGN §3) and
``accepted`` = new tokens - ``decoding_steps``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kangaroo_lit.bench.common import timed
from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder, make_drafter, reference_model
from kangaroo_lit.decoding.sampling import SamplingConfig
from kangaroo_lit.model import KangarooModel

METHOD_ORDER = ("vanilla", "generate", "pld", "pld7", "hf_early_exit", "lookup", "kangaroo", "kangaroo_lookup",
                "kangaroo_tree", "kangaroo_tree_lookup", "early_exit")
# Without --methods: all but pld7 (HF prompt lookup at 7 tokens is the peer for kernel-bound ablations) and
# the tree methods (the chain is the default decoder; the tree is its ablation).
DEFAULT_METHODS = tuple(m for m in METHOD_ORDER if m not in ("pld7", "kangaroo_tree", "kangaroo_tree_lookup"))
# Methods that decode with the trained draft (they need --artifact).
TRAINED_METHODS = ("kangaroo", "kangaroo_lookup", "kangaroo_tree", "kangaroo_tree_lookup")
HF_METHODS = ("generate", "pld", "pld7", "hf_early_exit")
# HF prompt lookup with 7 proposed tokens: its verification windows (8 rows) stay within the streaming
# kernel's row limit, as ``--prompt_lookup 7`` does.
PLD_KERNEL_TOKENS = 7


@dataclass
class TurnResult:
    """One turn's generation.

    Attributes:
        tokens: generated ids (an EOS that stopped generation included, nothing after it).
        wall_time: seconds of the generation call (prefill included).
        decoding_steps: forward passes of the full model.
        accept_lengths: tokens each such pass produced (Spec-Bench's accept lengths); empty when the
            method does not say (HF ``generate``).
        drafted: draft tokens verified (None when unknown; 0 for methods that do not draft).
        accepted: drafts accepted (None when unknown).
        draft_passes: forward passes of a separate draft computation (HF early exit), or the draft-path
            steps of the self-speculative decoder; None otherwise.
        round_drafted: the self-speculative decoder's drafts verified per round (empty otherwise).
    """

    tokens: list[int]
    wall_time: float
    decoding_steps: int
    accept_lengths: list[int] = field(default_factory=list)
    drafted: int | None = None
    accepted: int | None = None
    draft_passes: int | None = None
    round_drafted: list[int] = field(default_factory=list)


class Method:
    """A named way to decode one prompt with the verifying model of ``model``.

    Args:
        name: the method's key (file names, tables).
        description: one line for the report.
        model: the model; every method decodes with its verifier.
        eos: stop tokens (the tokenizer's and the generation config's).
    """

    def __init__(self, name: str, description: str, model: KangarooModel, eos: list[int]) -> None:
        self.name = name
        self.description = description
        self.model = model
        self.eos = eos

    def generate(self, ids: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig, seed: int) -> TurnResult:
        raise NotImplementedError


class DecoderMethod(Method):
    """The vanilla loop or the self-speculative decoder (they report accept lengths themselves)."""

    def __init__(self, name: str, description: str, model: KangarooModel, eos: list[int],
                 decoder: VanillaDecoder | SelfSpeculativeDecoder) -> None:
        super().__init__(name, description, model, eos)
        self.decoder = decoder

    def generate(self, ids: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig, seed: int) -> TurnResult:
        generator = torch.Generator(device=ids.device).manual_seed(seed)
        r = self.decoder.generate(ids, max_new_tokens, self.eos, temperature=sampling.temperature,
                                  top_p=sampling.top_p, top_k=sampling.top_k, generator=generator)
        speculative = isinstance(self.decoder, SelfSpeculativeDecoder)
        return TurnResult(tokens=r.tokens, wall_time=r.wall_time_s, decoding_steps=r.full_passes,
                          accept_lengths=list(r.accept_lengths), drafted=r.drafted if speculative else 0,
                          accepted=r.accepted, draft_passes=r.draft_steps if speculative else None,
                          round_drafted=list(r.round_drafted) if speculative else [])


class PassCounter:
    """Counts forward passes of an HF causal LM (a forward pre-hook), full ones apart from early-exit drafts.

    HF's early-exit assistant is the model itself run with ``config.num_hidden_layers`` lowered for the
    duration of a draft; a pass that sees the full layer count is a pass of the full model.
    """

    def __init__(self, lm) -> None:
        self.lm = lm
        self.decoder = getattr(lm, lm.base_model_prefix, lm)
        self.full_layers = self.decoder.config.num_hidden_layers
        self.full_passes = 0
        self.full_input_tokens = 0
        self.draft_passes = 0

    def _hook(self, module, args, kwargs) -> None:
        if self.decoder.config.num_hidden_layers != self.full_layers:
            self.draft_passes += 1
            return
        self.full_passes += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            self.full_input_tokens += ids.shape[-1]

    @contextlib.contextmanager
    def counting(self) -> Iterator[PassCounter]:
        handle = self.lm.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


@contextlib.contextmanager
def plain_generation_config(lm, eos: list[int], pad: int) -> Iterator[None]:
    """``lm.generation_config`` replaced by one that sets only the special tokens, for the enclosed calls.

    A checkpoint's ``generation_config.json`` may turn on sampling, a repetition penalty or top-k, which
    ``generate`` would apply under our explicit arguments too; then ``generate`` would no longer decode
    the distribution the vanilla loop decodes.
    """
    from transformers import GenerationConfig

    saved = lm.generation_config
    lm.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad,
                                            bos_token_id=getattr(saved, "bos_token_id", None))
    try:
        yield
    finally:
        lm.generation_config = saved


class HFGenerateMethod(Method):
    """HF ``generate`` of the verifying model, plain or with one of its self-speculation options.

    Args:
        generate_kwargs: what selects the method (``{}`` for plain decoding, ``prompt_lookup_num_tokens``
            ..., ``assistant_early_exit`` ...).
    """

    def __init__(self, name: str, description: str, model: KangarooModel, eos: list[int],
                 generate_kwargs: dict[str, Any]) -> None:
        super().__init__(name, description, model, eos)
        self.generate_kwargs = generate_kwargs

    def generate(self, ids: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig, seed: int) -> TurnResult:
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, num_beams=1, do_sample=not sampling.greedy,
                                      **self.generate_kwargs)
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        with (reference_model(self.model) as lm, plain_generation_config(lm, self.eos, self.eos[0] if self.eos else 0),
              PassCounter(lm).counting() as counter, torch.inference_mode()):
            torch.manual_seed(seed)
            out, wall = timed(lambda: lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs),
                              ids.device)
        tokens = cut_at_eos(out[0, ids.shape[1]:].tolist(), self.eos)
        steps = counter.full_passes
        # Each full pass reads one committed token (the prompt, for the first) plus the candidates it verifies.
        drafted = max(0, counter.full_input_tokens - ids.shape[1] - max(0, steps - 1))
        early_exit = "assistant_early_exit" in self.generate_kwargs
        return TurnResult(tokens=tokens, wall_time=wall, decoding_steps=steps, accept_lengths=[], drafted=drafted,
                          accepted=max(0, len(tokens) - steps),
                          draft_passes=counter.draft_passes if early_exit else None)


def cut_at_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """``tokens`` up to and including the first stop token (HF pads nothing at batch size 1; be sure)."""
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[: i + 1]
    return tokens


def build_methods(model: KangarooModel, eos: list[int], names: list[str], trained: bool, threshold: float,
                  max_draft: int, pld_num_tokens: int = 10, pld_ngram_size: int = 3,
                  prompt_lookup: int = 7, skip_below: float = 0.0, tree=None, lookup_cost=None) -> list[Method]:
    """The methods called ``names`` (a subset of :data:`METHOD_ORDER`; :data:`TRAINED_METHODS` need
    ``trained``, ``early_exit`` its absence), in the order given. ``tree``: the
    :class:`~kangaroo_lit.settings.DecodingSettings` of the tree methods (width, nodes, depth, cost model).
    ``lookup_cost``: the :class:`~kangaroo_lit.decoding.cost.DecodeCost` the lookup methods size their window
    by (None: a fixed window of ``prompt_lookup`` tokens)."""
    L = model.exit_layer
    draft = f"exit layer {L}, threshold {threshold:g}, max_draft {max_draft}" + (
        f", skip_below {skip_below:g}" if skip_below else "")

    window = (f"at most {prompt_lookup} copied tokens, n-grams 3..2, "
              + (f"window sized by the cost model ({lookup_cost.source})" if lookup_cost else "fixed window"))

    def adapter_decoder(lookup: int) -> SelfSpeculativeDecoder:
        return SelfSpeculativeDecoder(model, drafter=make_drafter("adapter", threshold, max_draft, lookup,
                                                                  skip_below=skip_below, lookup_cost=lookup_cost))

    def tree_decoder(lookup: int) -> SelfSpeculativeDecoder:
        return SelfSpeculativeDecoder(model, drafter=make_drafter(
            "tree", prompt_lookup=lookup, tree_width=tree.tree_width, tree_nodes=tree.tree_nodes,
            tree_depth=tree.tree_depth, cost=tree.decode_cost(model), lookup_cost=lookup_cost))

    def tree_description() -> str:
        cost = tree.decode_cost(model)
        return (f"exit layer {L}, width {tree.tree_width}, at most {tree.tree_nodes} nodes and depth "
                f"{tree.tree_depth}, sized by the cost model ({cost.source})")

    made: dict[str, Any] = {
        "vanilla": lambda: DecoderMethod("vanilla", "vanilla loop (kangaroo_lit VanillaDecoder), the baseline",
                                         model, eos, VanillaDecoder(model)),
        "generate": lambda: HFGenerateMethod("generate", "HF generate", model, eos, {}),
        "pld": lambda: HFGenerateMethod(
            "pld", f"HF prompt lookup (prompt_lookup_num_tokens={pld_num_tokens}, "
            f"max_matching_ngram_size={pld_ngram_size})", model, eos,
            {"prompt_lookup_num_tokens": pld_num_tokens, "max_matching_ngram_size": pld_ngram_size}),
        "pld7": lambda: HFGenerateMethod(
            "pld7", f"HF prompt lookup (prompt_lookup_num_tokens={PLD_KERNEL_TOKENS}, "
            f"max_matching_ngram_size={pld_ngram_size})", model, eos,
            {"prompt_lookup_num_tokens": PLD_KERNEL_TOKENS, "max_matching_ngram_size": pld_ngram_size}),
        "lookup": lambda: DecoderMethod(
            "lookup", f"prompt lookup alone in the self-speculative decoder ({window}; a round without a match "
            "is a plain step)", model, eos,
            SelfSpeculativeDecoder(model, drafter=make_drafter("lookup", prompt_lookup=prompt_lookup,
                                                               lookup_cost=lookup_cost))),
        "hf_early_exit": lambda: HFGenerateMethod(
            "hf_early_exit", f"HF assistant_early_exit={L + 1} (layers 0..{L}, untrained), "
            f"num_assistant_tokens={max_draft}, assistant_confidence_threshold={threshold:g}", model, eos,
            {"assistant_early_exit": L + 1, "num_assistant_tokens": max_draft,
             "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": threshold}),
        "kangaroo": lambda: DecoderMethod("kangaroo", f"Kangaroo self-speculative, trained draft ({draft})", model,
                                          eos, adapter_decoder(0)),
        "kangaroo_lookup": lambda: DecoderMethod(
            "kangaroo_lookup", f"Kangaroo self-speculative + prompt lookup ({window}), trained draft ({draft})",
            model, eos,
            adapter_decoder(prompt_lookup)),
        "kangaroo_tree": lambda: DecoderMethod(
            "kangaroo_tree", f"Kangaroo self-speculative, tree drafts of the trained draft ({tree_description()})",
            model, eos, tree_decoder(0)),
        "kangaroo_tree_lookup": lambda: DecoderMethod(
            "kangaroo_tree_lookup", f"Kangaroo tree drafts + prompt lookup ({window}; tree: {tree_description()})",
            model, eos, tree_decoder(prompt_lookup)),
        "early_exit": lambda: DecoderMethod("early_exit", f"self-speculative, untrained early exit ({draft})", model,
                                            eos, adapter_decoder(0)),
    }
    out = []
    for name in names:
        if name in TRAINED_METHODS and not trained:
            raise ValueError(f"method {name!r} needs a trained draft (--artifact)")
        if name == "early_exit" and trained:
            raise ValueError("method 'early_exit' is the untrained draft; with --artifact it is 'kangaroo'")
        out.append(made[name]())
    return out
