"""``kangaroo-lit bench tree_vs_chain``: chain vs tree drafts at a device's own costs, with a draft of known agreement.

Whether a tree pays depends on two things: how often the draft's runner-up tokens are right (its top-k
agreement) and what verifying more tokens costs on the device (``v_k``). A trained draft and a real model
are not always at hand where the device is (a lent GPU has no network), so this benchmark builds both
sides from parts: a model with random weights of a given shape (or ``--base_model``), and a *synthetic
calibrated draft* whose top-k agreement follows a profile (default: the shipped SmolLM2 draft's,
measured teacher-forced on Spec-Bench-style answers: top-1 0.239, top-2 0.319, top-3 0.362, top-4 0.384,
top-8 0.438). At each position the draft puts probability ``profile[r] - profile[r-1]`` on its rank-``r``
token and places the model's true next token (from a vanilla run) at rank ``r`` with that same
probability, so it is calibrated by construction and its confidence means what the cost model assumes.

Each method decodes the same prompt, interleaved, ``--runs`` times (median): the vanilla loop, the chain
at each of ``--thresholds`` (``--max_draft`` drafts at most; the chain is sized by its threshold, so it
gets several and the best counts), and the tree sized by ``--cost_model`` (a ``bench cost_model`` report
of this device) or the built-in table. ``predicted`` is the cost model's speedup for the rounds each
method actually made. Outputs are compared with the vanilla loop's (bf16 batches may round apart).

    python -m kangaroo_lit.bench tree_vs_chain --shape llama2-7b --device cuda --dtype bfloat16 \\
        --cost_model $OUT/bench/decode_cost_llama2-7b_cuda.json --tree_nodes 15
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

import torch

from kangaroo_lit.bench.common import (
    DType,
    Shape,
    machine_info,
    markdown_table,
    print_table,
    resolve_device,
    timed,
    torch_threads,
    write_outputs,
)
from kangaroo_lit.bench.gpu_suite import append_row
from kangaroo_lit.errors import ConfigError

# Teacher-forced top-k agreement of the shipped SmolLM2-135M-Instruct draft on the model's own greedy
# answers to Spec-Bench-style questions (issue 16): P(true token within the draft's top k), k = 1..8.
SMOLLM2_PROFILE = (0.239, 0.319, 0.362, 0.384, 0.402, 0.416, 0.428, 0.438)


def synthetic_draft(reference: list[int], prompt_length: int, vocab: int, profile: tuple[float, ...], seed: int):
    """A draft-logits hook (:data:`~kangaroo_lit.decoding.drafters.DraftLogitsFn`): calibrated, with the
    given top-k agreement profile, deterministic per position (chain and tree see the same draft)."""
    steps = [profile[0], *(b - a for a, b in zip(profile, profile[1:]))]
    if any(p < 0 for p in steps) or profile[-1] > 1:
        raise ConfigError(f"--profile must be non-decreasing top-k agreements in [0, 1], got {list(profile)}")
    rest = (1.0 - profile[-1]) / max(1, vocab - len(steps))
    cache: dict[int, torch.Tensor] = {}

    def hook(logits: torch.Tensor, position: int) -> torch.Tensor:
        if position not in cache:
            rng = torch.Generator().manual_seed(seed * 1_000_003 + position)
            index = position - prompt_length
            true = reference[index] if 0 <= index < len(reference) else 0
            ranked = torch.randperm(vocab, generator=rng)[: len(steps) + 1].tolist()
            ranked = [t for t in ranked if t != true][: len(steps)]
            u = float(torch.rand((), generator=rng))
            rank = next((r for r, p in enumerate(profile) if u < p), None)
            if rank is not None:
                ranked[rank] = true
            probs = torch.full((vocab,), rest, dtype=torch.float64)
            probs[ranked] = torch.tensor(steps, dtype=torch.float64)
            cache[position] = probs.log()
        return cache[position].to(logits.dtype).to(logits.device).expand_as(logits)

    return hook


def tree_vs_chain(
    shape: Shape = "small",
    base_model: str | None = None,
    exit_layer: int = 1,
    dtype: DType = "float32",
    device: str = "auto",
    cost_model: str | None = None,
    kernel: str = "eager",
    profile: tuple[float, ...] = SMOLLM2_PROFILE,
    prompt_tokens: int = 64,
    new_tokens: int = 128,
    max_draft: int = 6,
    thresholds: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6),
    tree_width: int = 4,
    tree_nodes: int = 7,
    tree_depth: int = 6,
    runs: int = 3,
    seed: int = 0,
    threads: int | None = None,
    out_dir: str | None = None,
    rows_file: str | None = None,
) -> dict[str, Any]:
    """Vanilla loop, chain and tree on one prompt with a synthetic draft of known agreement; returns the report.

    Args:
        shape: random-weight Llama shape (unless ``base_model``).
        base_model: an HF model (name or directory) instead of random weights.
        exit_layer: exit layer L of the draft path.
        dtype: dtype of the whole model.
        device: torch device; auto = cuda when available, else cpu.
        cost_model: a ``bench cost_model`` report (``decode_cost_*.json``) of this device for the tree's size;
            default the built-in table of the device and kernel.
        kernel: eager or streaming (CPU float32) linear layers, for every method alike.
        profile: the synthetic draft's top-k agreement, k = 1, 2, ... (non-decreasing).
        prompt_tokens: random prompt length.
        new_tokens: tokens generated per decode.
        max_draft: the chain's most drafts a round.
        thresholds: the chain's confidence thresholds, one method each (``chain@t``).
        tree_width, tree_nodes, tree_depth: the tree drafter's caps.
        runs: interleaved repeats (median).
        seed: weights, prompt and draft seed.
        threads: torch CPU threads (default on CPU: 1).
        out_dir: write tree_vs_chain_<device>.json and .md here.
        rows_file: append the result as one JSON line (the GPU suite's rows).
    """
    from kangaroo_lit.bench.cost_model import build_cost_model
    from kangaroo_lit.cli_scaffold import kernel_linears
    from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder
    from kangaroo_lit.decoding.drafters import AdapterDrafter
    from kangaroo_lit.decoding.tree import TreeDrafter
    from kangaroo_lit.settings import DecodingSettings

    config = dict(locals())
    torch_device = resolve_device(device)
    config["device"] = str(torch_device)
    settings = DecodingSettings.for_options("--", drafter="tree", tree_width=tree_width, tree_nodes=tree_nodes,
                                            tree_depth=tree_depth, cost_model=cost_model, kernel=kernel,
                                            max_draft=max_draft)
    with torch_threads(threads or (1 if torch_device.type == "cpu" else None)):
        model, name = build_cost_model(shape, base_model, exit_layer, dtype, torch_device, seed)
        cost = settings.decode_cost(model)
        vocab = model.config.vocab_size
        prompt = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
        prompt = prompt.to(torch_device)
        with kernel_linears(model, kernel):
            vanilla = VanillaDecoder(model)
            reference = vanilla.generate(prompt, new_tokens).tokens
            hook = synthetic_draft(reference, prompt_tokens, vocab, tuple(profile), seed)
            methods = {"vanilla": vanilla}
            for t in thresholds:
                methods[f"chain@{t:g}"] = SelfSpeculativeDecoder(model, drafter=AdapterDrafter(t, max_draft, hook))
            methods["tree"] = SelfSpeculativeDecoder(model, drafter=TreeDrafter(cost, tree_width, tree_nodes,
                                                                                tree_depth, hook))
            results: dict[str, list] = {m: [] for m in methods}
            for _ in range(runs):
                for method, decoder in methods.items():
                    result, seconds = timed(lambda decoder=decoder: decoder.generate(prompt, new_tokens), torch_device)
                    results[method].append((result, seconds))
    rows = {}
    base_time = statistics.median(s for _, s in results["vanilla"])
    for method, runs_of in results.items():
        result = runs_of[-1][0]
        seconds = statistics.median(s for _, s in runs_of)
        rounds = max(1, result.full_passes - 1)
        rows[method] = {
            "seconds": seconds, "tokens_per_s": len(result.tokens) / seconds, "speedup": base_time / seconds,
            "mat": result.mat, "accept_rate": result.accept_rate if method != "vanilla" else None,
            "drafts_per_round": result.drafted / rounds if method != "vanilla" else 0.0,
            "draft_steps_per_round": result.draft_steps / rounds if method != "vanilla" else 0.0,
            "identical": result.tokens == reference,
            "predicted_speedup": _predicted(result, cost) if method != "vanilla" else 1.0,
        }
    report = {"mode": "tree_vs_chain", "model": name, "config": config, "cost": {
        "source": cost.source, "c": cost.draft_step, "v": {k: cost.verify_cost(k) for k in (2, 4, 8, 16)}},
        "machine": machine_info(torch_device), "rows": rows}
    # The chain at its best threshold, by measured speed (its fair setting on this device).
    best = max((m for m in rows if m.startswith("chain@")), key=lambda m: rows[m]["speedup"], default=None)
    report["best_chain"] = best
    append_row(rows_file, {"bench": "tree_vs_chain", "model": name, "dtype": dtype, "device": str(torch_device),
                           **{m: {k: r[k] for k in ("speedup", "mat", "predicted_speedup")} for m, r in rows.items()}})
    header, table = _table(report)
    print_table(f"Tree vs chain ({name}, {dtype}, exit layer {exit_layer}; cost: {cost.source})", header, table)
    if out_dir:
        write_outputs(out_dir, f"tree_vs_chain_{torch_device.type}", report,
                      f"## Tree vs chain\n\n{markdown_table(header, table)}\n")
    if best:
        tree = rows["tree"]
        print(f"tree_vs_chain: tree {tree['speedup']:.2f}x ({tree['predicted_speedup']:.2f}x predicted); "
              f"best chain, {best}: {rows[best]['speedup']:.2f}x ({rows[best]['predicted_speedup']:.2f}x predicted)",
              file=sys.stderr)
    return report


def _predicted(result, cost) -> float:
    """The cost model's speedup for these rounds: tokens after the first / (draft steps c + sum of v_{k+1})."""
    time = result.draft_steps * cost.draft_step + sum(cost.verify_cost(k + 1) for k in result.round_drafted)
    return (len(result.tokens) - 1) / time if time else 1.0


def _table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "tokens/s", "speedup", "predicted", "MAT", "drafts / round", "draft steps / round",
              "identical"]
    table = []
    for method, r in report["rows"].items():
        table.append([method, f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x", f"{r['predicted_speedup']:.2f}x",
                      f"{r['mat']:.2f}", f"{r['drafts_per_round']:.2f}", f"{r['draft_steps_per_round']:.2f}",
                      str(r["identical"])])
    return header, table
