"""``kangaroo-lit bench threshold_curve``: predicted speedup against the draft threshold, from the cost model.

Greedy decoding of the model's own answers can be replayed without decoding: teacher-forced over a held-out
answer that the model itself wrote greedily, the draft's top-1 token and its (calibrated) confidence at
each position are exactly what a chain round starting there sees, up to its first wrong draft (until
then the round's context *is* the answer's). So the tokens each round yields, for any ``threshold``,
``max_draft`` and ``skip_below``, follow from one forward pass per answer; only the draft steps spent after
a round's first wrong draft are estimated (with the confidences at those positions in the true context).
Timed by the cost model (a round: ``k c + v_{k+1}`` plus ``--verify_extra``; a plain step 1), the replay
gives the speedup over the vanilla loop for a grid of settings in seconds, and the best of them: the
defaults the cost model derives for this draft on this device, instead of hand-picked ones::

    kangaroo-lit bench threshold_curve --artifact drafts/smollm2-135m-instruct \\
        --data_path data/self_instruct/smollm2-135m-instruct/answers.jsonl.gz --max_rows 150 --first_row 150 \\
        --cost builtin:cpu_streaming --verify_extra 0.071 --out_dir runs/bench/threshold

``--data_path``: Dolly-format answers the draft was not trained on, written greedily by the same model
(``self_instruct`` / ``distill``), so that the full model's greedy token is the answer's next token.
Writes ``threshold_curve.json``, ``.md`` and ``.png`` (speedup against threshold, one line per max_draft).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from kangaroo_lit.decoding.cost import DecodeCost, load_cost


@dataclass
class ForcedAnswer:
    """One answer, teacher-forced: per response position, whether the draft's top-1 equals the full
    model's greedy token there, and the draft's confidence (top probability at its calibrated temperature)."""

    correct: list[bool]
    confidence: list[float]


@dataclass
class Replay:
    """What a replay of chain rounds over answers gives."""

    tokens: int  # tokens after each answer's first (the prefill's)
    rounds: int  # full-model passes after the prefill
    drafted: int
    accepted: int
    draft_steps: int
    steps: float  # predicted time, in plain decoding steps

    @property
    def speedup(self) -> float:
        return self.tokens / self.steps if self.steps else 1.0

    @property
    def mat(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0


def replay_chain(answers: list[ForcedAnswer], threshold: float, max_draft: int, skip_below: float,
                 cost: DecodeCost, verify_extra: float = 0.0) -> Replay:
    """Greedy chain rounds (:class:`~kangaroo_lit.decoding.drafters.AdapterDrafter`) over teacher-forced answers.

    Position ``j`` of an answer is the draft for its token ``j + 1`` (the first token comes from the
    prefill). A round starting at ``i`` drafts at ``i, i+1, ...`` until a draft's confidence is below
    ``threshold`` (that draft kept), ``max_draft`` drafts or the answer's end; it accepts up to its first
    wrong draft and adds the full model's token.
    """
    out = Replay(0, 0, 0, 0, 0, 0.0)
    for answer in answers:
        n = len(answer.correct)
        i = 0
        while i < n:
            out.rounds += 1
            if answer.confidence[i] < skip_below:  # the first draft is not worth verifying: a plain step
                out.draft_steps += 1
                out.steps += cost.draft_step + cost.verify_cost(1) + verify_extra
                out.tokens += 1
                i += 1
                continue
            k, accepted, alive = 0, 0, True
            budget = min(max_draft, max(1, n - i - 1))  # as the decoder: a round yields at most k + 1
            while k < budget:
                alive = alive and answer.correct[i + k]
                accepted += alive
                k += 1
                if threshold > 0 and answer.confidence[i + k - 1] < threshold:
                    break
            out.drafted += k
            out.accepted += accepted
            out.draft_steps += k
            out.steps += k * cost.draft_step + cost.verify_cost(k + 1) + verify_extra
            gained = min(accepted + 1, n - i)
            out.tokens += gained
            i += gained
    return out


@torch.inference_mode()
def force_answers(model, examples) -> list[ForcedAnswer]:
    """Teacher-forced draft top-1 correctness and confidence over each example's response positions."""
    temperature = float(getattr(model, "confidence_temperature", 1.0))
    answers = []
    for example in examples:
        ids = torch.tensor([example.ids], device=model.causal_lm.device)
        out = model(ids)
        start = max(example.n_prompt - 1, 0)
        draft = out.exit_logits[0, start:-1].double()
        full = out.main_logits[0, start:-1].argmax(-1)
        top = model.draft_token_ids(draft.argmax(-1)) if model.draft_vocab is not None else draft.argmax(-1)
        confidence = (draft / temperature).softmax(-1).max(-1).values
        # Position 0's token is the prefill's: the draft at response position j proposes token j + 1.
        answers.append(ForcedAnswer(correct=(top == full).tolist()[1:], confidence=confidence.tolist()[1:]))
    return answers


def threshold_curve(
    artifact: str,
    data_path: str,
    max_rows: int = 150,
    first_row: int = 0,
    thresholds: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    max_drafts: tuple[int, ...] = (1, 2, 3, 4, 6),
    skip_below: tuple[float, ...] = (0.0,),
    cost: str = "builtin:cpu_streaming",
    verify_extra: float = 0.0,
    max_length: int = 512,
    threads: int | None = None,
    out_dir: str | None = None,
    record: bool = False,
) -> dict[str, Any]:
    """Replay chain decoding over held-out greedy answers for a grid of settings; returns the report.

    Args:
        artifact: directory written by ``kangaroo-lit export`` (calibrate it first: ``kangaroo-lit calibrate``).
        data_path: Dolly-format rows the draft was not trained on, answered greedily by the same model.
        max_rows: use N rows from ``first_row``.
        first_row: skip the rows before it (e.g. those a calibration used).
        thresholds: draft confidence thresholds of the grid.
        max_drafts: most drafts per round of the grid.
        skip_below: first-draft confidences below which a round is a plain step (0 = off).
        cost: ``builtin:cpu_streaming|cpu_eager|gpu`` or a ``bench cost_model`` report (decode_cost_*.json).
        verify_extra: plain steps added to every verification pass (``c_shallow`` for ``lora.scope: draft``,
            whose verifier re-runs the shallow layers without LoRA).
        max_length: longest example in tokens.
        threads: torch CPU threads (default: the project's rule).
        out_dir: write threshold_curve.json, .md and .png here.
        record: write the best setting to the artifact's ``kangaroo.json`` (``sizing``): loading the draft
            (``load_draft``, ``specbench``) then defaults to its threshold, max_draft and skip_below.
    """
    from kangaroo_lit.bench.common import machine_info, markdown_table, print_table, write_outputs
    from kangaroo_lit.data.rows import load_file_rows
    from kangaroo_lit.data.tokenize import RowEncoder, TruncationStats, has_chat_template
    from kangaroo_lit.decoding.session import load_for_decoding
    from kangaroo_lit.embedded import resolve_path
    from kangaroo_lit.threads import apply_threads

    config = dict(locals())
    loaded = load_for_decoding(artifact=artifact, dtype="float32")
    model, tokenizer, manifest = loaded.model, loaded.tokenizer, loaded.manifest
    decode_cost = load_cost(cost, model.exit_layer)
    apply_threads(sum(p.numel() for p in model.parameters()), threads)
    recorded = ((manifest.get("training") or {}).get("data") or {}).get("use_chat_template")
    use_chat = bool(recorded) if recorded is not None else has_chat_template(tokenizer)
    rows = load_file_rows(resolve_path(data_path), "dolly", "error")[first_row:first_row + max_rows]
    examples = RowEncoder(tokenizer, max_length=max_length, use_chat_template=use_chat).encode_dolly(
        rows, 0, TruncationStats())
    answers = force_answers(model, examples)
    grid = []
    for skip in skip_below:
        for k in max_drafts:
            for t in thresholds:
                r = replay_chain(answers, t, k, skip, decode_cost, verify_extra)
                grid.append({"threshold": t, "max_draft": k, "skip_below": skip, "speedup": r.speedup, "mat": r.mat,
                             "accept_rate": r.accepted / r.drafted if r.drafted else 0.0,
                             "drafts_per_round": r.drafted / r.rounds if r.rounds else 0.0})
    best = max(grid, key=lambda g: g["speedup"])
    positions = sum(len(a.correct) for a in answers)
    top1 = sum(sum(a.correct) for a in answers) / max(1, positions)
    report = {"mode": "threshold_curve", "config": config, "cost": decode_cost.source,
              "confidence_temperature": float(getattr(model, "confidence_temperature", 1.0)),
              "answers": len(answers), "positions": positions, "top1_agreement": top1, "grid": grid, "best": best,
              "machine": machine_info("cpu")}
    header = ["skip_below", "max_draft", *(f"t={t:g}" for t in thresholds)]
    table = [[f"{s:g}", str(k), *(f"{g['speedup']:.3f}" for g in grid if g["max_draft"] == k and g["skip_below"] == s)]
             for s in skip_below for k in max_drafts]
    print_table(f"Predicted speedup over the vanilla loop ({decode_cost.source}; top-1 agreement {top1:.3f} on "
                f"{positions} positions)", header, table)
    print(f"best: threshold {best['threshold']:g}, max_draft {best['max_draft']}, skip_below {best['skip_below']:g}: "
          f"{best['speedup']:.3f}x predicted", file=sys.stderr)
    if out_dir:
        write_outputs(out_dir, "threshold_curve", report, markdown_table(header, table), plot=_plot)
    if record:
        record_sizing(artifact, {**{k: best[k] for k in ("threshold", "max_draft", "skip_below")},
                                 "predicted_speedup": round(best["speedup"], 4), "cost": decode_cost.source,
                                 "verify_extra": verify_extra, "data": str(data_path), "rows": len(answers),
                                 "first_row": first_row, "top1_agreement": round(top1, 4)})
        print(f"recorded in {artifact}/kangaroo.json (sizing): threshold {best['threshold']:g}, max_draft "
              f"{best['max_draft']}, skip_below {best['skip_below']:g}", file=sys.stderr)
    return report


def record_sizing(artifact: str, sizing: dict[str, Any]) -> None:
    """Write ``sizing`` into the artifact's ``kangaroo.json`` (atomically: a crash leaves the old file)."""
    from kangaroo_lit.artifact import record_in_manifest

    record_in_manifest(artifact, "sizing", sizing)


def _plot(report: dict[str, Any], path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for skip in sorted({g["skip_below"] for g in report["grid"]}):
        for k in sorted({g["max_draft"] for g in report["grid"]}):
            points = [g for g in report["grid"] if g["max_draft"] == k and g["skip_below"] == skip]
            label = f"max_draft {k}" + (f", skip_below {skip:g}" if skip else "")
            ax.plot([g["threshold"] for g in points], [g["speedup"] for g in points], marker="o", label=label)
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xlabel("threshold (calibrated draft confidence)")
    ax.set_ylabel("predicted speedup over the vanilla loop")
    ax.set_title(f"Chain sizing by the cost model ({report['answers']} held-out answers)", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
