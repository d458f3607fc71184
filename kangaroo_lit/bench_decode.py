"""``kangaroo-lit bench decode``: decoding speed of self-speculative decoding, and its cost model.

Speed comparison (default mode), greedy, batch 1, in one process, interleaved per prompt (the order
of the methods rotates from prompt to prompt): the self-speculative decoder at each threshold, the
vanilla loop (:class:`~kangaroo_lit.decoding.VanillaDecoder`) and HF ``generate(do_sample=False)`` of
the verifying model. Aggregation as DESIGN §3: a prompt's tokens/s = its new tokens / wall time; per
run, a method's speedup = mean over prompts of its tokens/s / the same mean of the vanilla loop; mean
and standard deviation over ``--runs``::

    kangaroo-lit bench decode --model ../shared/models/stories260k-hf --exit-layer 1,2 \\
        --stories-prompts runs/stories/data/heldout.jsonl --max-new-tokens 200 --thresholds 0,0.3,0.6
    kangaroo-lit bench decode --artifact runs/tiny/artifact --prompts prompts.jsonl --out /tmp/bench

Cost model (``--cost-model``): a model with random weights built from a config directly on the device
(``--shape tiny|small|llama2-7b``; nothing is written to disk), timed with CUDA-synchronised wall
clocks, the median of ``--repeats`` at a fixed context of ``--context`` cached tokens:

* ``c``: one draft step (shallow layers ``0..L`` + adapter + exit head, one token) / one full step
  (the HF model's forward over one token, i.e. one step of the vanilla loop); ``c_no_adapter``
  (shallow layers + final norm + ``lm_head``: plain early exit) and ``c_shallow`` (layers ``0..L`` only);
* ``v_k``: the decoder's verification pass (deep layers + norm + ``lm_head`` over k tokens) / one full
  step, and ``raw_k``: the HF model's full forward over k tokens / one full step;
* forced acceptance: every deep layer's ``o_proj`` and ``down_proj`` zeroed (the residual stream
  passes through), the adapter's ``o_proj`` zero (plain early exit), so drafts agree with the full
  model; threshold 0, ``--max-draft`` K: the realised speedup over the vanilla loop against the
  prediction ``(K + 1) / (K c + v_{K+1})``::

    python -m kangaroo_lit.bench_decode decode --cost-model --shape llama2-7b --device cuda \\
        --dtype bfloat16 --exit-layer 1,2 --out $OUT/bench_decode

``python -m kangaroo_lit.bench_decode`` avoids ``kangaroo_lit.cli`` (LightningCLI needs jsonargparse);
this module imports torch and transformers only (Lightning only for ``--artifact``).
Outputs under ``--out``: JSON (every number, the machine, the versions), a Markdown table and, for the
speed comparison, a PNG plot (matplotlib, Agg).
"""

from __future__ import annotations

import os

# Offline before any Hugging Face import: the benchmark never touches the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from kangaroo_lit.architectures import DTYPES, resolve_dtype  # noqa: E402

DEFAULT_PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "Tom and Lily went to the park. They saw",
    "def fibonacci(n):",
]

# Llama shapes for the cost model: ``tiny`` = the test fixtures' size, ``small`` a CPU-sized model,
# ``llama2-7b`` Llama-2-7B's shape (random weights; ~13.5 GB in bf16, built on the device).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256),
    "small": dict(vocab_size=4096, hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=8,
                  intermediate_size=688),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                      intermediate_size=11008),
}

METHODS = ("speculative", "vanilla", "generate")


# --------------------------------------------------------------------------------------------------
# Arguments
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:  # a range "2-8"
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kangaroo-lit bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("decode", help="decoding speed: speculative vs vanilla vs HF generate, or the cost model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--artifact", help="directory written by `kangaroo-lit export`")
    src.add_argument("--model", help="HF model name or directory (with --exit-layer): untrained adapter")
    p.add_argument("--base-model", help="with --artifact: override the base model's name or path")
    p.add_argument("--exit-layer", type=_ints, default=None,
                   help="exit layer(s) L for --model or the cost model, e.g. 1 or 1,2 (cost model default: 1)")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", help=".txt (one prompt per line) or JSONL/JSON with prompt/instruction")
    prompts.add_argument("--stories-prompts",
                         help="JSONL of {\"text\": ...}: the first --prompt-tokens tokens of each are a prompt")
    p.add_argument("--prompt-tokens", type=int, default=8, help="prompt length for --stories-prompts")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="use the first N prompts (default: all; 10 for --stories-prompts)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--thresholds", type=_floats, default=[0.0, 0.3, 0.6], help="comma list, one row each")
    p.add_argument("--max-draft", type=int, default=6)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", type=int, default=3, help="repeats of the whole comparison (mean and std over runs)")
    p.add_argument("--warmup", type=int, default=1, help="prompts decoded by every method first, not recorded")
    p.add_argument("--out", help="write JSON, Markdown and PNG here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: 1; small models run fastest on one thread, and on a "
                        "shared machine more threads spin-wait for busy cores: 20x slower was seen on 2 cores)")
    cost = p.add_argument_group("cost model")
    cost.add_argument("--cost-model", action="store_true", help="measure c, v_k and the forced-acceptance speedup")
    cost.add_argument("--shape", choices=list(SHAPES), default="small",
                      help="random-weight Llama shape for the cost model (unless --model is given)")
    cost.add_argument("--context", type=int, default=512, help="cached tokens before each timed step")
    cost.add_argument("--ks", type=_ints, default=list(range(2, 9)), help="tokens per verification pass, e.g. 2-8")
    cost.add_argument("--repeats", type=int, default=30, help="timed repeats per measurement (median)")
    cost.add_argument("--forced-new-tokens", type=int, default=None,
                      help="tokens per forced-acceptance decode (default 1 + 18 (max_draft + 1))")
    cost.add_argument("--no-forced", action="store_true", help="skip the forced-acceptance run")
    return parser


# --------------------------------------------------------------------------------------------------
# Shared helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    return info


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _pm(stat: dict[str, float], fmt: str = ".1f") -> str:
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(markdown_table(header, rows))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*r)
    Console(width=200).print(table)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Speed comparison
def load_models(args: argparse.Namespace) -> tuple[dict[int, Any], Any, str]:
    """({exit_layer: KangarooModel}, tokenizer, base name) for --artifact or --model (+ --exit-layer)."""
    from transformers import AutoTokenizer

    from kangaroo_lit.embedded import resolve_path

    if args.artifact:
        from kangaroo_lit.artifact import load_artifact, read_manifest

        base = resolve_path(args.base_model or read_manifest(args.artifact)["base_model"])
        model = load_artifact(args.artifact, dtype=args.dtype, device=args.device, base_model=args.base_model)
        return {model.exit_layer: model}, AutoTokenizer.from_pretrained(base), base
    if not args.model:
        raise ValueError("give --artifact or --model (with --exit-layer), or --cost-model")
    if not args.exit_layer:
        raise ValueError("--model needs --exit-layer")
    from kangaroo_lit.architectures import load_base_model
    from kangaroo_lit.model import KangarooModel

    base = resolve_path(args.model)
    dtype = resolve_dtype(args.dtype)
    lm = load_base_model(base, dtype).to(args.device)
    models = {}
    for layer in args.exit_layer:  # one adapter per exit layer over the same frozen base
        models[layer] = KangarooModel(lm, layer, trainable_dtype=dtype).to(args.device).eval().requires_grad_(False)
    return models, AutoTokenizer.from_pretrained(base), base


def load_prompt_ids(args: argparse.Namespace, tokenizer) -> list[torch.Tensor]:
    """The prompts as (1, T) id tensors on CPU."""
    if args.stories_prompts:
        limit = args.num_prompts or 10
        out = []
        with open(args.stories_prompts) as f:
            for line in f:
                if not line.strip():
                    continue
                ids = tokenizer(json.loads(line)["text"]).input_ids[: args.prompt_tokens]
                out.append(torch.tensor([ids]))
                if len(out) >= limit:
                    break
        if not out:
            raise ValueError(f"{args.stories_prompts} holds no story")
        return out
    if args.prompts:
        from kangaroo_lit.data.prompt_file import load_prompts, render_prompt

        texts = [render_prompt(e, tokenizer) for e in load_prompts(args.prompts)]
    else:
        texts = list(DEFAULT_PROMPTS)
    if args.num_prompts:
        texts = texts[: args.num_prompts]
    return [tokenizer(t, return_tensors="pt").input_ids for t in texts]


def hf_generate(lm, ids: torch.Tensor, max_new_tokens: int, eos: int | None) -> tuple[list[int], float]:
    """HF ``generate(do_sample=False)``: (new tokens, wall seconds)."""
    pad = eos if eos is not None else 0
    with torch.inference_mode():
        sync(ids.device)
        start = time.perf_counter()
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad)
        sync(ids.device)
        wall = time.perf_counter() - start
    return out[0, ids.shape[1]:].tolist(), wall


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder, reference_model

    models, tokenizer, base = load_models(args)
    device = torch.device(args.device)
    prompts = [p.to(device) for p in load_prompt_ids(args, tokenizer)]
    eos = tokenizer.eos_token_id
    first = next(iter(models.values()))
    # Every (exit layer, threshold) is its own speculative method; vanilla and generate are shared.
    spec_keys = [(layer, t) for layer in models for t in args.thresholds]
    decoders = {key: SelfSpeculativeDecoder(models[key[0]], threshold=key[1], max_draft=args.max_draft)
                for key in spec_keys}
    vanilla = VanillaDecoder(first)
    methods: list[Any] = ["vanilla", "generate", *spec_keys]

    def run_one(method, ids) -> dict[str, Any]:
        if method == "vanilla":
            r = vanilla.generate(ids, args.max_new_tokens, eos)
        elif method == "generate":
            with reference_model(first) as lm:
                tokens, wall = hf_generate(lm, ids, args.max_new_tokens, eos)
            return {"tokens": tokens, "wall_time_s": wall, "tokens_per_s": len(tokens) / wall}
        else:
            r = decoders[method].generate(ids, args.max_new_tokens, eos)
        return {"tokens": r.tokens, "wall_time_s": r.wall_time_s, "tokens_per_s": r.tokens_per_s,
                "full_passes": r.full_passes, "drafted": r.drafted, "accepted": r.accepted}

    for ids in prompts[: args.warmup]:
        for m in methods:
            run_one(m, ids)

    records: list[dict[str, Any]] = []
    for run in range(args.runs):
        for i, ids in enumerate(prompts):
            shift = (run * len(prompts) + i) % len(methods)
            results = {}
            for m in methods[shift:] + methods[:shift]:
                results[m] = run_one(m, ids)
            same_vg = results["vanilla"]["tokens"] == results["generate"]["tokens"]
            for m, r in results.items():
                rec = {"run": run, "prompt": i, "prompt_tokens": ids.shape[1], "new_tokens": len(r["tokens"]),
                       **{k: v for k, v in r.items() if k != "tokens"}}
                if isinstance(m, tuple):
                    rec.update(method="speculative", exit_layer=m[0], threshold=m[1],
                               identical=same_vg and r["tokens"] == results["vanilla"]["tokens"],
                               identical_to_vanilla=r["tokens"] == results["vanilla"]["tokens"])
                else:
                    rec.update(method=m, identical=same_vg)
                records.append(rec)
            print(f"run {run + 1}/{args.runs} prompt {i + 1}/{len(prompts)}: "
                  + ", ".join(f"{_name(m)} {results[m]['tokens_per_s']:.1f}" for m in methods) + " tokens/s",
                  file=sys.stderr)

    rows = [aggregate(records, layer, t, args.runs) for layer, t in spec_keys]
    return {
        "mode": "speed",
        "model": base,
        "artifact": args.artifact,
        "config": {k: v for k, v in vars(args).items() if k not in ("action",)},
        "machine": machine_info(device),
        "num_prompts": len(prompts),
        "rows": rows,
        "records": records,
    }


def _name(method) -> str:
    return f"L{method[0]}/t{method[1]:g}" if isinstance(method, tuple) else method


def aggregate(records: list[dict], layer: int, threshold: float, runs: int) -> dict[str, Any]:
    """One row (exit layer, threshold): DESIGN §3 aggregation, mean and std over runs."""
    def pick(rec) -> str | None:
        if rec["method"] == "speculative":
            return "speculative" if (rec["exit_layer"], rec["threshold"]) == (layer, threshold) else None
        return rec["method"]

    per_run: dict[str, list[float]] = {k: [] for k in (*METHODS, "speedup_vs_vanilla", "speedup_vs_generate",
                                                        "vanilla_over_generate")}
    for run in range(runs):
        tps = {m: [] for m in METHODS}
        for rec in records:
            m = pick(rec)
            if m is not None and rec["run"] == run:
                tps[m].append(rec["tokens_per_s"])
        means = {m: statistics.fmean(v) for m, v in tps.items()}
        for m in METHODS:
            per_run[m].append(means[m])
        per_run["speedup_vs_vanilla"].append(means["speculative"] / means["vanilla"])
        per_run["speedup_vs_generate"].append(means["speculative"] / means["generate"])
        per_run["vanilla_over_generate"].append(means["vanilla"] / means["generate"])
    spec = [r for r in records if pick(r) == "speculative"]
    vg = [r for r in records if r["method"] == "vanilla"]
    passes = sum(r["full_passes"] for r in spec)
    drafted = sum(r["drafted"] for r in spec)
    return {
        "exit_layer": layer,
        "threshold": threshold,
        "tokens_per_s": {m: mean_std(per_run[m]) for m in METHODS},
        "speedup_vs_vanilla": mean_std(per_run["speedup_vs_vanilla"]),
        "speedup_vs_generate": mean_std(per_run["speedup_vs_generate"]),
        "vanilla_over_generate": mean_std(per_run["vanilla_over_generate"]),
        "mat": sum(r["new_tokens"] for r in spec) / passes if passes else 0.0,
        "accept_rate": sum(r["accepted"] for r in spec) / drafted if drafted else 0.0,
        "identical_fraction": statistics.fmean(float(r["identical"]) for r in spec),
        "identical_spec_vanilla": statistics.fmean(float(r["identical_to_vanilla"]) for r in spec),
        "identical_vanilla_generate": statistics.fmean(float(r["identical"]) for r in vg),
        "new_tokens_mean": statistics.fmean(r["new_tokens"] for r in spec),
    }


SPEED_HEADER = ["exit layer", "threshold", "speculative tok/s", "vanilla tok/s", "generate tok/s",
                "speedup vs vanilla", "speedup vs generate", "vanilla / generate", "MAT", "acceptance",
                "identical"]


def speed_rows(report: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in report["rows"]:
        t = r["tokens_per_s"]
        out.append([str(r["exit_layer"]), f"{r['threshold']:g}", _pm(t["speculative"]), _pm(t["vanilla"]),
                    _pm(t["generate"]), _pm(r["speedup_vs_vanilla"], ".3f"), _pm(r["speedup_vs_generate"], ".3f"),
                    _pm(r["vanilla_over_generate"], ".3f"), f"{r['mat']:.2f}", f"{r['accept_rate']:.3f}",
                    f"{r['identical_fraction']:.3f}"])
    return out


def speed_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    c = report["config"]
    head = (f"Model `{report['artifact'] or report['model']}`, {report['num_prompts']} prompts, "
            f"{c['max_new_tokens']} new tokens max, max_draft {c['max_draft']}, {c['dtype']} on {m['device']} "
            f"({m['gpu'] or m['cpu']}, {m['torch_threads']} torch threads), {c['runs']} runs (mean ± std over runs), "
            f"torch {m['torch']}, "
            f"transformers {m['transformers']}, {m['date']}.")
    return head + "\n\n" + markdown_table(SPEED_HEADER, speed_rows(report)) + "\n"


def speed_plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["rows"]
    labels = [f"L{r['exit_layer']}\nt={r['threshold']:g}" for r in rows]
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows) + 2), 4.5))
    for j, m in enumerate(METHODS):
        xs = [i + (j - 1) * width for i in range(len(rows))]
        ax.bar(xs, [r["tokens_per_s"][m]["mean"] for r in rows], width,
               yerr=[r["tokens_per_s"][m]["std"] for r in rows], capsize=3, label=m)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"decoding speed: {Path(str(report['artifact'] or report['model'])).name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------
# Cost model
def build_cost_model(args: argparse.Namespace, exit_layer: int):
    """(KangarooModel, description): random weights from a config on the device, or --model loaded."""
    from transformers import AutoModelForCausalLM

    from kangaroo_lit.model import KangarooModel
    from kangaroo_lit.tiny import tiny_config

    dtype = resolve_dtype(args.dtype)
    if args.model:
        from kangaroo_lit.architectures import load_base_model
        from kangaroo_lit.embedded import resolve_path

        lm = load_base_model(resolve_path(args.model), dtype).to(args.device)
        name = args.model
    else:
        shape = SHAPES[args.shape]
        config = tiny_config("llama", max_position_embeddings=4096, rms_norm_eps=1e-5, **shape)
        torch.manual_seed(args.seed)
        with torch.device(args.device):
            lm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        lm.requires_grad_(False).eval()
        name = f"random {args.shape}"
    model = KangarooModel(lm, exit_layer, trainable_dtype=dtype).to(args.device).eval().requires_grad_(False)
    return model, name


def time_interleaved(fns: dict[str, tuple[Callable[[], Any], Callable[[], None]]], repeats: int, warmup: int,
                     device: torch.device) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Seconds of each ``fn`` (its ``reset`` runs untimed after every call), round-robin over the functions
    so that a noisy neighbour slows them all alike: (medians, quartiles [q1, median, q3])."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + repeats):
        for name, (fn, reset) in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            elapsed = time.perf_counter() - start
            reset()
            if rep >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(v) for name, v in times.items()}, {
        name: statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3 for name, v in times.items()}


def measure_costs(model, context: int, ks: list[int], repeats: int, device: torch.device, seed: int = 0):
    """Per-step times at a fixed context (seconds, medians) and the ratios c, v_k, raw_k."""
    from transformers import DynamicCache

    from kangaroo_lit.decoding import crop_layers

    lm = model.causal_lm
    n_layers, exit_layer = model.num_layers, model.exit_layer
    g = torch.Generator().manual_seed(seed)
    k_max = max(ks)
    ids = torch.randint(3, model.config.vocab_size, (1, context + k_max), generator=g).to(device)
    prompt = ids[:, :context]
    tok = ids[:, context:context + 1]
    pos1 = torch.tensor([[context]], device=device)
    with torch.inference_mode():
        full_cache = DynamicCache()
        lm(input_ids=prompt, past_key_values=full_cache, use_cache=True, logits_to_keep=1)
        positions = torch.arange(context + k_max, device=device)[None]
        shallow_cache, deep_cache, adapter_cache, blocks_cache = (DynamicCache() for _ in range(4))
        embeds = model.embed(ids)
        hidden = model.shallow(embeds[:, :context], positions[:, :context], cache=shallow_cache)
        model.run_layers(hidden, exit_layer + 1, n_layers, positions[:, :context], cache=deep_cache)
        model.draft_logits(hidden, positions[:, :context], cache=adapter_cache)
        model.run_layers(embeds[:, :context], 0, n_layers, positions[:, :context], cache=blocks_cache)
        # Shallow states of the k verified tokens (what the decoder keeps while drafting).
        verify_hidden = model.shallow(embeds[:, context:], positions[:, context:], cache=DynamicCache())
        head = lambda h: lm.lm_head(lm.model.norm(h))

        shallow_layers, deep_layers, all_layers = range(exit_layer + 1), range(exit_layer + 1, n_layers), \
            range(n_layers)
        reset_full = lambda: crop_layers(full_cache, all_layers, context)
        reset_blocks = lambda: crop_layers(blocks_cache, all_layers, context)
        reset_deep = lambda: crop_layers(deep_cache, deep_layers, context)

        def reset_draft():
            crop_layers(shallow_cache, shallow_layers, context)
            crop_layers(adapter_cache, range(1), context)

        def draft_step():
            h = model.shallow(model.embed(tok), pos1, cache=shallow_cache)
            return model.draft_logits(h, pos1, cache=adapter_cache)[:, -1].argmax(-1)

        fns = {
            "full": (lambda: lm(input_ids=tok, past_key_values=full_cache, use_cache=True, logits_to_keep=1),
                     reset_full),
            "full_blocks": (lambda: head(model.run_layers(model.embed(tok), 0, n_layers, pos1, cache=blocks_cache)),
                            reset_blocks),
            "draft": (draft_step, reset_draft),
            "exit_no_adapter": (lambda: head(model.shallow(model.embed(tok), pos1, cache=shallow_cache)),
                                reset_draft),
            "shallow": (lambda: model.shallow(model.embed(tok), pos1, cache=shallow_cache), reset_draft),
        }
        for k in ks:
            pos_k = positions[:, context:context + k]
            fns[f"verify_{k}"] = (lambda k=k, pos_k=pos_k: model.deep_logits(verify_hidden[:, :k], pos_k,
                                                                             cache=deep_cache), reset_deep)
            fns[f"raw_{k}"] = (lambda k=k: lm(input_ids=ids[:, context:context + k], past_key_values=full_cache,
                                              use_cache=True), reset_full)
        times, quartiles = time_interleaved(fns, repeats, warmup=max(2, repeats // 5), device=device)
    full = times["full"]
    return {
        "context": context,
        "times_s": times,
        "quartiles_s": quartiles,
        "c": times["draft"] / full,
        "c_no_adapter": times["exit_no_adapter"] / full,
        "c_shallow": times["shallow"] / full,
        "full_blocks_over_hf": times["full_blocks"] / full,
        "v": {k: times[f"verify_{k}"] / full for k in ks},
        "raw": {k: times[f"raw_{k}"] / full for k in ks},
    }


def force_acceptance(model) -> None:
    """Deep layers pass the residual stream through (o_proj, down_proj = 0), the adapter is the plain exit."""
    with torch.no_grad():
        for idx in range(model.exit_layer + 1, model.num_layers):
            layer = model.layers[idx]
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
        model.adapter.self_attn.o_proj.weight.zero_()
        if model.adapter.self_attn.o_proj.bias is not None:
            model.adapter.self_attn.o_proj.bias.zero_()


def forced_speedup(model, costs: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Realised speedup with forced acceptance (threshold 0, max_draft K) against the cost-model prediction.

    Speculative, vanilla and HF ``generate`` decode the same random prompt of ``--context`` tokens to
    exactly ``n`` new tokens (no EOS), interleaved, ``--runs`` times (medians). Each also decodes one
    token alone (prefill + first token); subtracting it gives the decode phase, which is what the
    prediction describes.
    """
    from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder, reference_model

    force_acceptance(model)
    k = args.max_draft
    n_new = args.forced_new_tokens or 1 + 18 * (k + 1)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.context), generator=g).to(device)
    spec = SelfSpeculativeDecoder(model, threshold=0.0, max_draft=k)
    vanilla = VanillaDecoder(model)
    results: dict[str, Any] = {}

    def run(method: str, n: int) -> tuple[list[int], float]:
        if method == "generate":
            with reference_model(model) as lm:
                lm.generation_config.eos_token_id = None  # exactly n tokens, like the decoders without EOS
                return hf_generate(lm, prompt, n, None)
        r = (spec if method == "speculative" else vanilla).generate(prompt, n, None)
        if n == n_new:
            results[method] = r
        return r.tokens, r.wall_time_s

    methods = ["speculative", "vanilla", "generate"]
    for m in methods:  # warm-up
        run(m, n_new)
    walls: dict[str, list[float]] = {m: [] for m in methods}
    prefill: dict[str, list[float]] = {m: [] for m in methods}
    tokens: dict[str, list[int]] = {}
    for rep in range(args.runs):
        shift = rep % len(methods)
        for m in methods[shift:] + methods[:shift]:
            tokens[m], wall = run(m, n_new)
            walls[m].append(wall)
            prefill[m].append(run(m, 1)[1])
    med = {m: statistics.median(v) for m, v in walls.items()}
    med_prefill = {m: statistics.median(v) for m, v in prefill.items()}
    tps = {m: len(tokens[m]) / med[m] for m in methods}
    decode_tps = {m: (len(tokens[m]) - 1) / (med[m] - med_prefill[m]) for m in methods}
    c, v = costs["c"], costs["v"]
    if k + 1 not in v:
        raise ValueError(f"--ks must include max_draft + 1 = {k + 1} for the prediction")
    predicted = (k + 1) / (k * c + v[k + 1])
    # The decoder also runs the shallow layers once more per round (the last draft's state for verification).
    predicted_refined = (k + 1) / (k * c + costs["c_shallow"] + v[k + 1])
    decode_only = decode_tps["speculative"] / decode_tps["vanilla"]
    r = results["speculative"]
    return {
        "max_draft": k,
        "new_tokens": {m: len(t) for m, t in tokens.items()},
        "prompt_tokens": args.context,
        "runs": args.runs,
        "wall_time_s": med,
        "prefill_wall_time_s": med_prefill,
        "tokens_per_s": tps,
        "decode_tokens_per_s": decode_tps,
        "mat": r.mat,
        "accept_rate": r.accept_rate,
        "identical": tokens["speculative"] == tokens["vanilla"] == tokens["generate"],
        "vanilla_over_generate": tps["vanilla"] / tps["generate"],
        "vanilla_over_generate_decode_only": decode_tps["vanilla"] / decode_tps["generate"],
        "predicted": predicted,
        "predicted_refined": predicted_refined,
        "realised": tps["speculative"] / tps["vanilla"],
        "realised_decode_only": decode_only,
        "realised_vs_generate": tps["speculative"] / tps["generate"],
        "realised_over_predicted": decode_only / predicted,
        "realised_over_predicted_with_prefill": tps["speculative"] / tps["vanilla"] / predicted,
    }


def run_cost_model(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    layers = args.exit_layer or [1]
    results = []
    name = None
    for layer in layers:
        model, name = build_cost_model(args, layer)
        print(f"cost model: {name}, exit layer {layer}, {args.dtype} on {device}, context {args.context}",
              file=sys.stderr)
        costs = measure_costs(model, args.context, args.ks, args.repeats, device, args.seed)
        entry = {"exit_layer": layer, **costs}
        if not args.no_forced:
            entry["forced"] = forced_speedup(model, costs, args, device)
        results.append(entry)
        del model
        gc.collect()  # free one 7B model before building the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "mode": "cost_model",
        "model": name,
        "shape": None if args.model else {"name": args.shape, **SHAPES[args.shape]},
        "config": {k: v for k, v in vars(args).items() if k not in ("action",)},
        "machine": machine_info(device),
        "layers": results,
    }


def cost_tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) tables of a cost-model report."""
    layers = report["layers"]
    ks = sorted(int(k) for k in layers[0]["v"])
    tables = []
    header = ["exit layer", "full step (ms)", "c (draft)", "c no adapter", "c shallow only", "blocks / HF step"]
    rows = [[str(e["exit_layer"]), f"{1000 * e['times_s']['full']:.3f}", f"{e['c']:.3f}", f"{e['c_no_adapter']:.3f}",
             f"{e['c_shallow']:.3f}", f"{e['full_blocks_over_hf']:.3f}"] for e in layers]
    tables.append(("Step costs relative to one full decoding step", header, rows))
    header = ["k", *[f"v_k (L={e['exit_layer']})" for e in layers], "raw full pass / step"]
    rows = [[str(k), *[f"{e['v'][k]:.3f}" for e in layers], f"{layers[0]['raw'][k]:.3f}"] for k in ks]
    tables.append(("Verification (deep layers, k tokens) and raw full pass, relative to one full step", header, rows))
    forced = [e for e in layers if "forced" in e]
    if forced:
        header = ["exit layer", "K", "spec tok/s", "vanilla tok/s", "generate tok/s", "vanilla / generate", "MAT",
                  "acceptance", "identical", "predicted", "predicted +shallow", "realised", "realised (decode only)",
                  "realised / predicted"]
        rows = []
        for e in forced:
            f = e["forced"]
            t = f["tokens_per_s"]
            rows.append([str(e["exit_layer"]), str(f["max_draft"]), f"{t['speculative']:.1f}", f"{t['vanilla']:.1f}",
                         f"{t['generate']:.1f}", f"{f['vanilla_over_generate']:.3f}", f"{f['mat']:.2f}",
                         f"{f['accept_rate']:.3f}",
                         str(f["identical"]), f"{f['predicted']:.3f}", f"{f['predicted_refined']:.3f}",
                         f"{f['realised']:.3f}", f"{f['realised_decode_only']:.3f}",
                         f"{f['realised_over_predicted']:.3f}"])
        tables.append(("Forced acceptance (threshold 0): realised vs predicted (K+1)/(K c + v_{K+1})", header, rows))
    return tables


def cost_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    c = report["config"]
    out = [f"{report['model']} ({c['dtype']} on {m['gpu'] or m['cpu']}, {m['torch_threads']} torch threads), "
           f"context {c['context']} tokens, median of "
           f"{c['repeats']} repeats; forced acceptance: median of {c['runs']} runs; torch {m['torch']}, "
           f"transformers {m['transformers']}, {m['date']}."]
    for title, header, rows in cost_tables(report):
        out += ["", f"{title}:", "", markdown_table(header, rows)]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
def _write(report: dict[str, Any], out_dir: str, stem: str, markdown: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(f"wrote {out / stem}.json, .md", file=sys.stderr)


def decode_main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark for parsed arguments; returns the report (also printed and written).

    The torch thread count is set for the run (``--threads``) and restored afterwards.
    """
    threads = args.threads or (1 if torch.device(args.device).type == "cpu" else None)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _decode_main(args)
    finally:
        torch.set_num_threads(previous)


def _decode_main(args: argparse.Namespace) -> dict[str, Any]:
    if args.cost_model:
        report = run_cost_model(args)
        for title, header, rows in cost_tables(report):
            print_table(title, header, rows)
        if args.out:
            stem = f"decode_cost_{'model' if args.model else args.shape}_{torch.device(args.device).type}"
            _write(report, args.out, stem, cost_markdown(report))
        return report
    report = run_speed(args)
    print_table("Decoding speed (mean ± std over runs)", SPEED_HEADER, speed_rows(report))
    if args.out:
        _write(report, args.out, "decode_speed", speed_markdown(report))
        if speed_plot(report, Path(args.out) / "decode_speed.png"):
            print(f"wrote {Path(args.out) / 'decode_speed.png'}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        decode_main(args)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
