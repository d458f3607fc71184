"""The cost model's prediction next to a Spec-Bench run's measured speedup, per method and subtask.

A self-speculative round costs ``draft_steps * c + v_{k+1}`` plain steps (``k`` drafts verified, ``c`` and
``v`` from ``kangaroo-lit bench cost_model``); a plain loop pays one step a token. The answers of a
``kangaroo-lit specbench`` run record, per turn, the tokens, the draft-path steps and the drafts verified
in each round, so the time the cost model predicts for them can be put beside the time measured. Where
the two disagree, the decoder pays for something the model leaves out (Python, masks, the draft path's
catch-up on accepted tokens); where they agree, the model may be trusted to say what another device's
``v_k`` would give, from the same rounds::

    python scripts/bench/cost_prediction.py runs/smollm2/tree --cost builtin:cpu_streaming --verify_extra 0.071
    python scripts/bench/cost_prediction.py runs/smollm2/tree-gpu --cost builtin:gpu

``--verify_extra``: steps added to every verification pass (the shallow layers' re-run without LoRA of a
draft with ``lora.scope: draft``, ``c_shallow`` of ``bench cost_model``; ``v_k`` covers the deep layers).
The prefill is left out of both sides (it is the same pass for every method). Writes
``cost_prediction.md`` and ``.json`` into the run directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kangaroo_lit.decoding.cost import DecodeCost, load_cost


def predicted_steps(choice: dict, cost: DecodeCost, verify_extra: float) -> tuple[int, float]:
    """(tokens after the first, predicted plain steps for them) of one answer line's turns."""
    tokens = sum(n - 1 for n in choice["new_tokens"] if n > 0)
    rounds = choice.get("round_drafted")
    if rounds is None:  # the vanilla loop (or HF generate): a step a token
        return tokens, float(tokens)
    draft_steps = sum(choice.get("draft_passes") or [0])
    time = draft_steps * cost.draft_step + sum(cost.verify_cost(k + 1) + verify_extra for turn in rounds for k in turn)
    return tokens, time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a kangaroo-lit specbench --out_dir (with summary.json)")
    parser.add_argument("--cost", default="builtin:cpu_streaming",
                        help="builtin:cpu_streaming|cpu_eager|gpu, or a bench cost_model decode_cost_*.json")
    parser.add_argument("--verify_extra", type=float, default=0.0, help="steps added to every verification pass")
    parser.add_argument("--run", type=int, default=1, help="which run's answers")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    cost = load_cost(args.cost, summary["exit_layer"])
    rows, table = [], []
    for method in summary["methods"]:
        path = run_dir / f"run_{args.run}" / f"{method}.jsonl"
        per_group: dict[str, list[float]] = {}
        for line in path.read_text().splitlines():
            record = json.loads(line)
            tokens, steps = predicted_steps(record["choices"][0], cost, args.verify_extra)
            for group in (record["category"], "overall"):
                totals = per_group.setdefault(_group(group, summary), [0, 0.0])
                totals[0] += tokens
                totals[1] += steps
        for group, (tokens, steps) in per_group.items():
            measured = summary["results"].get(group, {}).get(method, {}).get("speedup", {}).get("mean")
            predicted = tokens / steps if steps else None
            rows.append({"method": method, "group": group, "predicted_speedup": predicted,
                         "measured_speedup": measured, "tokens": tokens, "predicted_steps": steps})
            table.append(f"| {method} | {group} | {predicted:.2f}x | "
                         + (f"{measured:.2f}x |" if measured is not None else "- |"))
    header = (f"Cost model ({cost.source}; c = {cost.draft_step:g}, verify extra {args.verify_extra:g}) "
              f"vs measured, {run_dir}\n\n| method | subtask | predicted | measured |\n| --- | --- | --- | --- |\n")
    text = header + "\n".join(table) + "\n"
    print(text)
    (run_dir / "cost_prediction.md").write_text(text)
    (run_dir / "cost_prediction.json").write_text(json.dumps({"cost": cost.source, "verify_extra": args.verify_extra,
                                                              "rows": rows}, indent=1))


def _group(category: str, summary: dict) -> str:
    """The summary's group of a question category (Spec-Bench's subtask names)."""
    from kangaroo_lit.specbench.questions import subtask_of

    return "overall" if category == "overall" else (subtask_of(category) or category)


if __name__ == "__main__":
    main()
