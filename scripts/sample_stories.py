"""Sample stories from a causal LM itself, as plain-text training data for its draft.

A draft trained on the model's own samples learns to predict what the model will actually say
(the distribution decoding sees), which is what Kangaroo's self-distillation wants. Used for the
stories model (``../shared/models/stories260k-hf``)::

    python scripts/sample_stories.py --base_model ../shared/models/stories260k-hf \
        --out data/stories-train.jsonl --num 6000 --seed 0
    python scripts/sample_stories.py --base_model ../shared/models/stories260k-hf \
        --out data/stories-heldout.jsonl --num 300 --seed 1

Each output line is ``{"text": ...}`` (the DataModule's ``format: text``). Deterministic given the seed.
A local model directory needs no network; with ``--offline`` a Hub name is read from the local cache only.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from rich.progress import Progress
from transformers import AutoModelForCausalLM, AutoTokenizer


def sample_stories(model_path: str, num: int, seed: int, temperature: float = 0.8, max_new_tokens: int = 256,
                   batch_size: int = 128, local_files_only: bool = False) -> list[str]:
    """``num`` texts sampled from BOS at ``temperature``, each cut at its first EOS.

    ``local_files_only``: never contact the Hugging Face Hub (a Hub name must then be in the local cache).
    """
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=local_files_only)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=local_files_only)
    model.eval()
    eos = tokenizer.eos_token_id
    texts: list[str] = []
    with Progress() as progress, torch.inference_mode():
        task = progress.add_task("sampling stories", total=num)
        while len(texts) < num:
            n = min(batch_size, num - len(texts))
            prompt = torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                 pad_token_id=eos, eos_token_id=eos)
            for row in out[:, 1:].tolist():
                if eos in row:
                    row = row[: row.index(eos)]
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                if text:
                    texts.append(text)
            progress.update(task, completed=len(texts))
            if not progress.console.is_terminal:  # keep logs informative when redirected
                print(f"{len(texts)}/{num} stories", flush=True)
    return texts[:num]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", required=True, help="HF model directory or name")
    parser.add_argument("--out", required=True, help="output JSONL file")
    parser.add_argument("--num", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--offline", action="store_true", help="never contact the Hugging Face Hub (local files only)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = sample_stories(args.base_model, args.num, args.seed, args.temperature, args.max_new_tokens,
                           args.batch_size, local_files_only=args.offline)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, out)
    print(f"wrote {len(texts)} stories to {out}")


if __name__ == "__main__":
    main()
