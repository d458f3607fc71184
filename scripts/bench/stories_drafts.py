"""Train and measure the four stories-model drafts of BENCHMARKS.md (issue: "a draft worth having").

For exit layers 1 and 2, adapter alone (lora_rank 0) and with draft-scoped LoRA (rank 8): train with the
project's own ``fit`` (configs/stories.yaml), export, then on held-out self-sampled stories measure

* teacher-forced top-1 agreement of draft and full model, and expected acceptance Σ min(p, q);
* greedy decoding of 8-token prompts (200 new tokens) at thresholds 0, 0.3, 0.6: MAT, acceptance rate,
  tokens/s of the self-speculative decoder and of the vanilla loop (interleaved, same process), and
  whether every output equals the vanilla (plain greedy) output.

    M=../shared/models/stories260k-hf
    python scripts/sample_stories.py --base_model $M --out runs/stories/data/train.jsonl --num 4096 --seed 0
    python scripts/sample_stories.py --base_model $M --out runs/stories/data/heldout.jsonl --num 256 --seed 1
    python scripts/bench/stories_drafts.py --out_dir runs/stories/bench

Trained drafts are reused (``--retrain`` to train again). Results: ``<out_dir>/stories.json``, ``stories.md``,
``stories.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
VARIANTS = [(1, 0), (2, 0), (1, 8), (2, 8)]  # (exit_layer, lora_rank)


def train(base_model: str, exit_layer: int, lora_rank: int, root: Path, steps: int, retrain: bool, data: str) -> Path:
    ckpt = root / "checkpoints" / "last.ckpt"
    if ckpt.is_file() and not retrain:
        return ckpt
    from kangaroo_lit.cli import run_lightning

    run_lightning(["fit", "--config", str(REPO / "configs/stories.yaml"), "--model.base_model", base_model,
                   "--model.exit_layer", str(exit_layer), "--model.lora.rank", str(lora_rank),
                   "--trainer.max_steps", str(steps),
                   "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                   "--data.data_path", data])
    return ckpt


@torch.no_grad()
def agreement(model, stories: list[list[int]]) -> tuple[float, float]:
    """Teacher-forced top-1 agreement and expected acceptance over every position of the stories."""
    from kangaroo_lit.losses import expected_acceptance

    agree = accept = n = 0.0
    for ids in stories:
        out = model(torch.tensor([ids]))
        main, draft = out.main_logits[0, :-1].double(), out.exit_logits[0, :-1].double()
        positions = main.shape[0]
        agree += float((main.argmax(-1) == draft.argmax(-1)).sum())
        accept += float(expected_acceptance(draft, main)) * positions  # a per-story mean, re-weighted
        n += positions
    return agree / n, accept / n


def decode(model, prompts: list[list[int]], threshold: float, max_new: int, eos: int) -> dict:
    from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder

    spec = SelfSpeculativeDecoder(model, threshold=threshold, max_draft=6)
    vanilla = VanillaDecoder(model)
    spec_tps, van_tps, lengths, drafted, accepted, identical = [], [], [], 0, 0, 0
    for ids in prompts:
        x = torch.tensor([ids])
        v = vanilla.generate(x, max_new, eos)
        s = spec.generate(x, max_new, eos)
        spec_tps.append(s.tokens_per_s)
        van_tps.append(v.tokens_per_s)
        lengths += s.accept_lengths
        drafted += s.drafted
        accepted += s.accepted
        identical += int(s.tokens == v.tokens)
    return {
        "threshold": threshold,
        "mat": sum(lengths) / len(lengths),
        "accept_rate": accepted / max(1, drafted),
        "tokens_per_s": statistics.mean(spec_tps),
        "vanilla_tokens_per_s": statistics.mean(van_tps),
        "speedup": statistics.mean(spec_tps) / statistics.mean(van_tps),
        "identical": identical / len(prompts),
        "accept_lengths": lengths,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="runs/stories/bench")
    parser.add_argument("--base_model", default=str(REPO.parent / "shared/models/stories260k-hf"))
    parser.add_argument("--runs_dir", default="runs/stories")
    parser.add_argument("--train_data", default="runs/stories/data/train.jsonl")
    parser.add_argument("--heldout", default="runs/stories/data/heldout.jsonl")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--num_prompts", type=int, default=10)
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--thresholds", default="0,0.3,0.6")
    parser.add_argument("--agreement_stories", type=int, default=200)
    parser.add_argument("--variants", default=",".join(f"{e}:{r}" for e, r in VARIANTS),
                        help="exit_layer:lora_rank pairs")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    from transformers import AutoTokenizer

    from kangaroo_lit.architectures import load_base_model
    from kangaroo_lit.artifact import export_checkpoint, load_artifact
    from kangaroo_lit.model import KangarooModel

    base_path = args.base_model
    tok = AutoTokenizer.from_pretrained(base_path)
    texts = [json.loads(line)["text"] for line in Path(args.heldout).read_text().splitlines() if line.strip()]
    stories = [tok(t).input_ids + [tok.eos_token_id] for t in texts[: args.agreement_stories]]
    prompts = [tok(t).input_ids[:8] for t in texts[-args.num_prompts:]]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    results = []
    variants = [tuple(int(x) for x in v.split(":")) for v in args.variants.split(",")]
    for exit_layer in sorted({e for e, _ in variants}):  # untrained early exit, for reference
        model = KangarooModel(load_base_model(base_path), exit_layer).eval()
        top1, acc = agreement(model, stories)
        results.append({"exit_layer": exit_layer, "draft": "untrained early exit", "top1_agree": top1,
                        "expected_accept": acc, "decoding": []})
        print(f"untrained exit {exit_layer}: top-1 {top1:.3f}", file=sys.stderr)
    for exit_layer, rank in variants:
        name = f"L{exit_layer}-{'lora' if rank else 'adapter'}"
        root = Path(args.runs_dir) / name
        ckpt = train(base_path, exit_layer, rank, root, args.steps, args.retrain, args.train_data)
        model = load_artifact(export_checkpoint(ckpt, root / "artifact"), dtype="float32")
        top1, acc = agreement(model, stories)
        row = {"exit_layer": exit_layer, "draft": "adapter + draft-scoped LoRA r8" if rank else "adapter",
               "top1_agree": top1, "expected_accept": acc, "decoding": []}
        for t in thresholds:
            row["decoding"].append(decode(model, prompts, t, args.max_new_tokens, tok.eos_token_id))
        results.append(row)
        print(f"{name}: top-1 {top1:.3f}, " + ", ".join(
            f"t={d['threshold']}: MAT {d['mat']:.2f} speedup {d['speedup']:.2f}" for d in row["decoding"]),
            file=sys.stderr)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stories.json").write_text(json.dumps(results, indent=2))
    lines = ["| exit layer | draft | top-1 agree | E[accept] | threshold | MAT | accept rate | tokens/s | "
             "vanilla tokens/s | speedup | identical |", "|" + " --- |" * 11]
    for r in results:
        if not r["decoding"]:
            lines.append(f"| {r['exit_layer']} | {r['draft']} | {r['top1_agree']:.3f} | {r['expected_accept']:.3f} "
                         "| | | | | | | |")
        for d in r["decoding"]:
            lines.append(f"| {r['exit_layer']} | {r['draft']} | {r['top1_agree']:.3f} | {r['expected_accept']:.3f} | "
                         f"{d['threshold']} | {d['mat']:.2f} | {d['accept_rate']:.3f} | {d['tokens_per_s']:.1f} | "
                         f"{d['vanilla_tokens_per_s']:.1f} | {d['speedup']:.2f} | {d['identical']:.0%} |")
    (out / "stories.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, out / "stories.png")
    return 0


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in results if r["decoding"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in trained:
        label = f"L{r['exit_layer']} {r['draft']}"
        ts = [d["threshold"] for d in r["decoding"]]
        axes[0].plot(ts, [d["speedup"] for d in r["decoding"]], marker="o", label=label)
        best = max(r["decoding"], key=lambda d: d["speedup"])
        axes[1].hist(best["accept_lengths"], bins=range(1, 9), alpha=0.5, label=f"{label} (t={best['threshold']})")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set(xlabel="threshold", ylabel="speedup over vanilla", title="stories260k: speedup by threshold")
    axes[1].set(xlabel="tokens per full-model pass", ylabel="passes", title="accept lengths (best threshold)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
