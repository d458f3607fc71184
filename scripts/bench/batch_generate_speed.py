"""HF ``generate`` vs :func:`kangaroo_lit.data.batch_generate.generate_batch` (finished rows leave the
batch) on the same left-padded batch of chat prompts: wall time, new tokens, whether outputs agree.

    python scripts/bench/batch_generate_speed.py --base_model model:smollm2-135m-instruct \
        --requests data/self_instruct/smollm2-135m-instruct/requests.jsonl.gz --batch_size 32 --threads 1
"""

from __future__ import annotations

import argparse
import gzip
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default="model:smollm2-135m-instruct")
    parser.add_argument("--requests", required=True, help="self_instruct requests (.jsonl or .jsonl.gz)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from kangaroo_lit.architectures import load_base_model
    from kangaroo_lit.data.batch_generate import generate_batch
    from kangaroo_lit.embedded import resolve_path

    torch.set_num_threads(args.threads)
    path = resolve_path(args.base_model)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = load_base_model(path, "float32")
    opener = gzip.open if args.requests.endswith(".gz") else open
    with opener(args.requests, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    kept = [r["instruction"] for r in rows if r["status"] == "kept"][: args.batch_size]
    prompts = [tok.apply_chat_template([{"role": "user", "content": k}], tokenize=False, add_generation_prompt=True)
               for k in kept]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = tok.eos_token_id
    with torch.inference_mode():
        start = time.perf_counter()
        hf = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        hf_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = generate_batch(model, enc["input_ids"], enc["attention_mask"], args.max_new_tokens, {eos})
        ours_s = time.perf_counter() - start
    hf_rows = []
    for row in hf[:, enc["input_ids"].shape[1]:].tolist():
        hf_rows.append(row[: row.index(eos) + 1] if eos in row else row)
    tokens = sum(len(r) for r in ours)
    same = sum(a == b for a, b in zip(hf_rows, ours))
    print(f"{len(kept)} prompts, {tokens} new tokens, {args.threads} thread(s): HF generate {hf_s:.1f} s "
          f"({tokens / hf_s:.1f} tok/s), generate_batch {ours_s:.1f} s ({tokens / ours_s:.1f} tok/s): "
          f"{hf_s / ours_s:.2f}x; identical rows {same}/{len(kept)}")


if __name__ == "__main__":
    main()
