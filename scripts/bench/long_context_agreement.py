"""Does the draft agree less at long contexts? Teacher-forced top-1 agreement with the full model's
greedy token on held-out answers, each alone and after a prefix of other conversations.

The shipped SmolLM2 draft trains on examples cut at 256 tokens, while Spec-Bench's summarization and RAG
prompts run 450-930 tokens: its adapter never attended that far in training. Here each held-out
conversation is preceded by ``--prefix`` tokens of the following conversations (chat-formatted, the
whole of each), and agreement is counted on the held-out answer's positions (a draft outside a restricted
draft vocabulary counts as a miss). The full model's token is recomputed with the prefix, so the draft is
scored against what it would be verified against::

    python scripts/bench/long_context_agreement.py --artifact drafts/smollm2-135m-instruct \\
        --data_path runs/smollm2/data/si-heldout.jsonl.gz --rows 40 --prefix 0 300 700
"""

from __future__ import annotations

import argparse

import torch


def agreement(model, ids: list[int], start: int) -> tuple[int, int]:
    """(matches, positions) of the draft's argmax against the full model's over ``ids[start + 1:]``."""
    with torch.inference_mode():
        out = model(torch.tensor([ids]))
    full = out.main_logits[0, start:-1].argmax(-1)
    draft = model.draft_token_ids(out.exit_logits[0, start:-1].argmax(-1))
    return int((full == draft).sum()), full.numel()


def main() -> None:
    from kangaroo_lit.data.rows import load_file_rows
    from kangaroo_lit.data.tokenize import RowEncoder, TruncationStats
    from kangaroo_lit.decoding.session import load_for_decoding

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--data_path", required=True, help="held-out Dolly-format rows (the draft never saw)")
    parser.add_argument("--rows", type=int, default=40, help="held-out answers scored")
    parser.add_argument("--prefix", type=int, nargs="+", default=[0, 300, 700], help="prefix lengths in tokens")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_for_decoding(artifact=args.artifact)
    rows = load_file_rows(args.data_path, "dolly", "error")
    examples = RowEncoder(loaded.tokenizer, max_length=512, use_chat_template=True).encode_dolly(
        rows, 0, TruncationStats())
    if len(examples) < 2:
        raise SystemExit(f"{args.data_path}: need at least 2 rows (one scored, one for the prefix)")
    for prefix_length in args.prefix:
        matches = positions = 0
        for i, example in enumerate(examples[: args.rows]):
            prefix, j = [], i + 1
            while len(prefix) < prefix_length:
                prefix += examples[j % len(examples)].ids
                j += 1
            prefix = prefix[:prefix_length]
            m, n = agreement(loaded.model, prefix + example.ids, len(prefix) + max(example.n_prompt - 1, 0))
            matches, positions = matches + m, positions + n
        print(f"prefix {prefix_length:5d} tokens: top-1 agreement {matches / positions:.3f} over {positions} "
              "answer positions", flush=True)


if __name__ == "__main__":
    main()
