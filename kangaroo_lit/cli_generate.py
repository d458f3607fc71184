"""``kangaroo-lit generate``: decode prompts with the self-speculative decoder.

    kangaroo-lit generate --artifact runs/tiny/artifact --prompt "What is 12 plus 7?" --format instruction
    kangaroo-lit generate --model ../shared/models/stories260k-hf --exit-layer 1 --prompt "Once upon a time"

Without ``--artifact``, ``--model`` + ``--exit-layer`` decode with a freshly initialised adapter (the
untrained early exit): the machinery on any supported model, lossless but with little acceleration.
The text streams to stdout and a one-line summary follows (stderr); ``--json`` prints one JSON object
on stdout and nothing else there (DESIGN §4b).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from kangaroo_lit.architectures import DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kangaroo-lit generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", help="directory written by `kangaroo-lit export`")
    source.add_argument("--model", help="HF model name or directory (with --exit-layer): untrained adapter")
    parser.add_argument("--exit-layer", type=int, help="exit layer L for --model")
    parser.add_argument("--base-model", help="with --artifact: override the base model's name or path")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="the prompt text")
    prompts.add_argument("--prompt-file", help=".txt (one prompt per line) or JSONL/JSON with prompt/instruction")
    parser.add_argument("--format", choices=["raw", "instruction", "chat"], default="raw",
                        help="raw: the text as is; instruction: the training template (### Instruction: ...); "
                             "chat: the tokenizer's chat template (falls back to instruction)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.6, help="second early exit (Kangaroo: 0.6)")
    parser.add_argument("--max-draft", type=int, default=6, help="most drafts per round (Kangaroo: 6)")
    parser.add_argument("--compare-vanilla", action="store_true",
                        help="also decode with the vanilla loop: speedup and whether outputs are identical")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--json", action="store_true", help="print one JSON object (a list for several prompts)")
    return parser


def load_model(args: argparse.Namespace):
    """(KangarooModel, tokenizer) from an artifact or a plain HF model."""
    from transformers import AutoTokenizer

    from kangaroo_lit.embedded import resolve_path

    if args.artifact:
        from kangaroo_lit.artifact import load_artifact, read_manifest

        manifest = read_manifest(args.artifact)
        base = resolve_path(args.base_model or manifest["base_model"])
        model = load_artifact(args.artifact, dtype=args.dtype, device=args.device, base_model=args.base_model)
    else:
        if args.exit_layer is None:
            raise ValueError("--model needs --exit-layer")
        from kangaroo_lit.architectures import load_base_model, resolve_dtype
        from kangaroo_lit.model import KangarooModel

        base = resolve_path(args.model)
        dtype = resolve_dtype(args.dtype)
        model = KangarooModel(load_base_model(base, dtype), args.exit_layer, trainable_dtype=dtype)
        model.to(args.device).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(base)


def prompt_texts(args: argparse.Namespace, tokenizer) -> list[str]:
    from kangaroo_lit.data.prompt_file import load_prompts, render_prompt

    entries = load_prompts(args.prompt_file) if args.prompt_file else [{"raw": args.prompt}]
    texts = []
    for entry in entries:
        if args.format != "raw" and "raw" in entry:
            entry = {"instruction": entry["raw"], "context": ""}
        texts.append(render_prompt(entry, tokenizer, use_chat_template=args.format == "chat"))
    return texts


def decode_one(args, model, tokenizer, text: str, stream: bool) -> dict[str, Any]:
    from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder

    device = torch.device(args.device)
    ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
    eos = tokenizer.eos_token_id
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    printed = {"tokens": [], "text": ""}

    def on_round(info) -> None:
        printed["tokens"].extend(info.emitted)
        full = tokenizer.decode(printed["tokens"], skip_special_tokens=True)
        sys.stdout.write(full[len(printed["text"]):])
        sys.stdout.flush()
        printed["text"] = full

    decoder = SelfSpeculativeDecoder(model, threshold=args.threshold, max_draft=args.max_draft,
                                     on_round=on_round if stream else None)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    result = decoder.generate(ids, args.max_new_tokens, eos, generator=gen, **sampling)
    out: dict[str, Any] = {
        "text": tokenizer.decode(result.tokens, skip_special_tokens=True),
        "new_tokens": result.new_tokens,
        "wall_time_s": result.wall_time_s,
        "tokens_per_s": result.tokens_per_s,
        "decoding_steps": result.full_passes,
        "accept_lengths": result.accept_lengths,
        "mat": result.mat,
        "accept_rate": result.accept_rate,
    }
    if args.compare_vanilla:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        vanilla = VanillaDecoder(model).generate(ids, args.max_new_tokens, eos, generator=gen, **sampling)
        out["vanilla_tokens_per_s"] = vanilla.tokens_per_s
        out["speedup"] = result.tokens_per_s / vanilla.tokens_per_s if vanilla.tokens_per_s else None
        out["identical"] = (result.tokens == vanilla.tokens) if args.temperature == 0 else None
    return out


def summary_line(out: dict[str, Any]) -> str:
    line = (f"[{out['new_tokens']} tokens, {out['tokens_per_s']:.1f} tokens/s, MAT {out['mat']:.2f}, "
            f"acceptance {out['accept_rate']:.1%}")
    if "speedup" in out:
        same = {True: "identical to vanilla", False: "DIFFERS from vanilla", None: "sampling"}[out["identical"]]
        line += f", speedup {out['speedup']:.2f}x over vanilla ({out['vanilla_tokens_per_s']:.1f} tokens/s), {same}"
    return line + "]"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, tokenizer = load_model(args)
        texts = prompt_texts(args, tokenizer)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = []
    for text in texts:
        stream = not args.json and not args.compare_vanilla
        try:
            out = decode_one(args, model, tokenizer, text, stream)
        except ValueError as err:  # e.g. a prompt longer than the context allows
            print(f"error: {err}", file=sys.stderr)
            return 2
        results.append(out)
        if not args.json:
            if not stream:
                sys.stdout.write(out["text"])
            sys.stdout.write("\n")
            print(summary_line(out), file=sys.stderr)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
    return 0
