"""Calibrate a draft's confidence: one temperature so that its top probability reads as an acceptance
probability (``kangaroo-lit calibrate``).

Decoding stops drafting when a draft's top probability falls below ``threshold`` and can skip a round
whose first draft is below ``skip_below``; both only mean what they say if the draft is calibrated.
Drafts are often over-confident (the shipped SmolLM2 draft was right about 40% of the time where its top
probability was 0.6-0.8). Temperature scaling (Guo et al. 2017) fits one ``T`` on held-out answers:
teacher-forced over their response positions, the draft's logits ``z`` and the event that decoding pays
for, "the draft's top-1 equals the full model's greedy token". ``T`` minimises the negative
log-likelihood of the full model's token under ``softmax(z / T)`` (it does not change the argmax, so
greedy drafts are the same tokens; only the confidence moves). The artifact keeps ``T`` in
``kangaroo.json`` (``calibration``); loading it sets ``model.confidence_temperature``, which the adapter
drafter reads. The reliability before and after (expected calibration error, 10 bins) is recorded and
plotted (``calibration.png``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from kangaroo_lit.errors import ConfigError

IGNORE_INDEX = -100


def temperature_nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    """Mean ``-log softmax(logits / T)[target]`` over rows; (N, K) logits, (N,) target indices."""
    scaled = logits.double() / temperature
    return float((torch.logsumexp(scaled, dim=-1) - scaled.gather(1, targets[:, None]).squeeze(1)).mean())


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, low: float = 0.05, high: float = 20.0,
                    steps: int = 60) -> float:
    """The temperature minimising :func:`temperature_nll`, by golden-section search over ``log T``.

    The NLL of temperature scaling is convex in ``1 / T`` (a log-sum-exp of a linear function of it), so
    it is unimodal in ``log T`` and the search finds its minimum within ``[low, high]``.

    Args:
        logits: (N, K) draft logits of the counted positions.
        targets: (N,) index of the full model's token among the K draft outputs.
    """
    if logits.shape[0] == 0:
        raise ConfigError("no position to calibrate on: the held-out answers are empty, or none of their "
                          "tokens is in the draft's vocabulary")
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = temperature_nll(logits, targets, math.exp(c)), temperature_nll(logits, targets, math.exp(d))
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = temperature_nll(logits, targets, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = temperature_nll(logits, targets, math.exp(d))
    return math.exp((a + b) / 2)


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error and the per-bin table of (N,) confidences against (N,) 0/1 outcomes."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    table, ece = [], 0.0
    confidence, correct = confidence.double(), correct.double()
    for i in range(bins):
        upper = confidence <= edges[i + 1] if i == bins - 1 else confidence < edges[i + 1]
        inside = (confidence >= edges[i]) & upper
        n = int(inside.sum())
        if n:
            mean_conf, accuracy = float(confidence[inside].mean()), float(correct[inside].mean())
            ece += n / confidence.numel() * abs(mean_conf - accuracy)
            table.append({"bin": [round(float(edges[i]), 2), round(float(edges[i + 1]), 2)], "positions": n,
                          "confidence": round(mean_conf, 4), "accuracy": round(accuracy, 4)})
    return {"ece": round(ece, 4), "bins": table}


@torch.inference_mode()
def collect(model, examples, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced draft logits and the full model's greedy token over the examples' response positions.

    Args:
        model: a :class:`~kangaroo_lit.model.KangarooModel` (eval).
        examples: :class:`~kangaroo_lit.data.tokenize.Encoded` examples (ids, n_prompt).
        max_positions: stop collecting after this many positions.

    Returns:
        ``(logits, targets)``: (N, K) draft logits and (N,) the full model's token as an index into the K
        draft outputs (positions whose full token is outside a restricted draft vocabulary are left out:
        no draft could be accepted there whatever the confidence).
    """
    from kangaroo_lit.losses import draft_targets

    rows, targets, total = [], [], 0
    for example in examples:
        ids = torch.tensor([example.ids], device=model.causal_lm.device)
        out = model(ids)
        start = max(example.n_prompt - 1, 0)  # the position whose next token is the first response token
        draft = out.exit_logits[0, start:-1].float()
        full = out.main_logits[0, start:-1].argmax(-1)
        index = draft_targets(full, model.draft_vocab, out.main_logits.shape[-1])
        keep = index != IGNORE_INDEX
        rows.append(draft[keep].cpu())
        targets.append(index[keep].cpu())
        total += int(keep.sum())
        if total >= max_positions:
            break
    return torch.cat(rows)[:max_positions], torch.cat(targets)[:max_positions]


def calibrate(artifact: str, data_path: str, max_rows: int = 200, max_positions: int = 20000,
              format: Literal["chat", "instruction"] | None = None, max_length: int = 512, dtype: str = "float32",
              threads: int | None = None) -> dict[str, Any]:
    """Fit the artifact's confidence temperature on held-out answers and record it in ``kangaroo.json``.

    Args:
        artifact: directory written by ``kangaroo-lit export``; its ``kangaroo.json`` gains ``calibration``
            (rewritten atomically), and ``calibration.png`` is written beside it.
        data_path: Dolly-format rows (.jsonl, .jsonl.gz, .json) the draft was NOT trained on, ideally the
            model's own answers (``self_instruct`` / ``distill`` output), as decoding sees them.
        max_rows: use the first N rows.
        max_positions: stop after this many response positions.
        format: the prompt format, chat (the tokenizer's chat template) or instruction (the training
            template); default: as the draft was trained (its recorded data settings), else chat when the
            tokenizer has a chat template.
        max_length: longest example in tokens (longer ones are cut as training cuts them).
        dtype: model dtype.
        threads: torch CPU threads (default: the project's rule).

    Returns:
        The ``calibration`` record written to the manifest.
    """
    from kangaroo_lit.artifact import record_in_manifest
    from kangaroo_lit.data.rows import load_file_rows
    from kangaroo_lit.data.tokenize import RowEncoder, TruncationStats, has_chat_template
    from kangaroo_lit.decoding.session import load_for_decoding
    from kangaroo_lit.embedded import resolve_path
    from kangaroo_lit.threads import apply_threads

    if max_rows < 1 or max_positions < 1:
        raise ConfigError("max_rows and max_positions must be >= 1")
    loaded = load_for_decoding(artifact=artifact, dtype=dtype)
    model, tokenizer, manifest = loaded.model, loaded.tokenizer, loaded.manifest
    apply_threads(sum(p.numel() for p in model.parameters()), threads)
    if format is None:
        recorded = ((manifest.get("training") or {}).get("data") or {}).get("use_chat_template")
        use_chat_template = bool(recorded) if recorded is not None else has_chat_template(tokenizer)
    elif format in ("chat", "instruction"):
        use_chat_template = format == "chat"
    else:
        raise ConfigError(f"format must be chat or instruction, got {format!r}")
    rows = load_file_rows(resolve_path(data_path), "dolly", "error")[:max_rows]
    encoder = RowEncoder(tokenizer, max_length=max_length, use_chat_template=use_chat_template)
    examples = encoder.encode_dolly(rows, 0, TruncationStats())
    logits, targets = collect(model, examples, max_positions)
    before = model.confidence_temperature
    temperature = fit_temperature(logits, targets)
    correct = logits.argmax(-1) == targets
    record = {
        "temperature": round(temperature, 4),
        "event": "draft top-1 equals the full model's greedy token",
        "data": str(data_path), "rows": len(rows), "positions": int(targets.numel()),
        "top1_agreement": round(float(correct.double().mean()), 4),
        "nll_before": round(temperature_nll(logits, targets, before), 4),
        "nll_after": round(temperature_nll(logits, targets, temperature), 4),
        "before": reliability((logits.double() / before).softmax(-1).max(-1).values, correct),
        "after": reliability((logits.double() / temperature).softmax(-1).max(-1).values, correct),
    }
    record_in_manifest(artifact, "calibration", record)
    plot_reliability(record, Path(artifact) / "calibration.png")
    return record


def plot_reliability(record: dict[str, Any], path: Path) -> None:
    """Accuracy against confidence per bin, before and after calibration (the diagonal is perfect)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are an extra: the record in kangaroo.json holds the same numbers
        print("note: matplotlib not installed; no calibration.png", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    for key, label in (("before", "before (T = 1)"), ("after", f"after (T = {record['temperature']:.2f})")):
        bins = record[key]["bins"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                label=f"{label}, ECE {record[key]['ece']:.3f}")
    ax.set_xlabel("draft confidence (top probability)")
    ax.set_ylabel("accepted (greedy): draft top-1 = full model's")
    ax.set_title(f"Draft calibration, {record['positions']} positions")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``kangaroo-lit calibrate``: fit and record an artifact's confidence temperature (``--help``)."""
    from kangaroo_lit import cli_scaffold

    config = cli_scaffold.parse(cli_scaffold.build_parser(calibrate, "kangaroo-lit calibrate"), argv)

    def run() -> None:
        record = calibrate(**config)
        print(f"confidence temperature {record['temperature']:.3f} on {record['positions']} positions: expected "
              f"calibration error {record['before']['ece']:.3f} -> {record['after']['ece']:.3f} (top-1 "
              f"agreement {record['top1_agreement']:.3f}); written to {config['artifact']}/kangaroo.json, plot "
              "calibration.png", file=sys.stderr)

    return cli_scaffold.run_reporting(run)
