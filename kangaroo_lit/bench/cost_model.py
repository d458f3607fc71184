"""``kangaroo-lit bench cost_model``: the cost model of self-speculative decoding, and its check.

A model with random weights built from a config directly on the device (``--shape tiny|small|llama2-7b``;
nothing is written to disk), or ``--base_model``, timed with device-synchronised wall clocks, the median
of ``--repeats`` at a fixed context of ``--context`` cached tokens:

* ``c``: one draft step (shallow layers ``0..L`` + adapter + exit head, one token) / one full step
  (the HF model's forward over one token, i.e. one step of the vanilla loop); ``c_no_adapter``
  (shallow layers + final norm + ``lm_head``: plain early exit) and ``c_shallow`` (layers ``0..L`` only);
* ``v_k``: the decoder's verification pass (deep layers + norm + ``lm_head`` over k tokens) / one full
  step, and ``raw_k``: the HF model's full forward over k tokens / one full step;
* forced acceptance: every deep layer's ``o_proj`` and ``down_proj`` zeroed (the residual stream
  passes through), the adapter's ``o_proj`` zero (plain early exit), so drafts agree with the full
  model; threshold 0, ``--max_draft`` K: the realised speedup over the vanilla loop against the
  prediction ``(K + 1) / (K c + v_{K+1})``;
* with ``--hf_static_cache eager|compiled`` (once, with the first exit layer): HF ``generate`` on a static
  KV cache, its decoding step compiled by ``torch.compile`` (``compiled``) or not, beside HF's default
  (dynamic cache, eager) on the same prompt, the strongest plain-HF greedy baseline to quote a speedup
  against; compilation and warm-up are timed apart and not counted in its tokens/s::

    kangaroo-lit bench cost_model --shape small --exit_layer '[1,2]' --repeats 50 --runs 5 --out_dir /tmp/cost
    python -m kangaroo_lit.bench cost_model --shape llama2-7b --device cuda --dtype bfloat16 \\
        --exit_layer '[1,2]' --out_dir $OUT/bench_decode

Outputs under ``--out_dir``: ``decode_cost_<shape>_<device>.json`` (every number, the machine, the
versions) and ``.md`` (the tables), written at the end; with ``--rows_file`` each measurement (an exit
layer's costs, its forced run, the static-cache baseline) is also appended there as one JSON line the
moment it exists, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import gc
import statistics
import sys
from collections.abc import Callable
from typing import Any, Literal

import torch

from kangaroo_lit.bench.common import (
    SHAPES,
    DType,
    Shape,
    machine_info,
    markdown_table,
    print_table,
    random_base_model,
    resolve_device,
    rotated,
    shape_config,
    timed,
    torch_threads,
    write_outputs,
)
from kangaroo_lit.bench.decode import as_list, hf_generate
from kangaroo_lit.bench.gpu_suite import append_row
from kangaroo_lit.cli_scaffold import kernel_linears
from kangaroo_lit.errors import ConfigError
from kangaroo_lit.kernels import Kernel


def cost_model(
    shape: Shape = "small",
    base_model: str | None = None,
    exit_layer: int | tuple[int, ...] = 1,
    dtype: DType = "float32",
    device: str = "auto",
    context: int = 512,
    ks: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8),
    repeats: int = 30,
    max_draft: int = 6,
    runs: int = 3,
    forced: bool = True,
    forced_new_tokens: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    kernel: Kernel = "eager",
    draft_vocab_size: int | None = None,
    adapter_mlp: int = 0,
    hf_static_cache: Literal["off", "eager", "compiled"] = "off",
    out_dir: str | None = None,
    rows_file: str | None = None,
) -> dict[str, Any]:
    """Measure c, v_k and the forced-acceptance speedup; returns the report.

    Args:
        shape: random-weight Llama shape (unless ``base_model`` is given).
        base_model: time this HF model (name or directory) instead of a random shape.
        exit_layer: exit layer(s) L, e.g. 1 or [1,2]; one model each.
        dtype: dtype of the whole model.
        device: torch device; auto = cuda when available, else cpu.
        context: cached tokens before each timed step.
        ks: tokens per verification pass; must include max_draft + 1 for the prediction.
        repeats: timed repeats per measurement (median).
        max_draft: K of the forced-acceptance run.
        runs: forced-acceptance decodes per method (median).
        forced: run the forced-acceptance check (it zeroes weights of the model: last, per exit layer).
        forced_new_tokens: tokens per forced-acceptance decode (default 1 + 18 (max_draft + 1)).
        seed: seed of the random weights and the random prompts.
        threads: torch CPU threads for the run (default on CPU: 1), restored afterwards.
        kernel: linear layers of <= 8 rows: ``eager`` (``F.linear``) or ``streaming``
            (:mod:`kangaroo_lit.kernels.streaming_linear`, CPU float32), for the full step, the draft and
            verification alike.
        draft_vocab_size: K of a restricted draft head (``draft.vocab_size``; here the first K token ids, which
            costs the same as the K most frequent); None = the full vocabulary.
        adapter_mlp: width of the adapter's MLP block (``draft.adapter_mlp``; 0: none, Kangaroo's adapter), so
            that the wider draft's ``c`` is timed, not estimated.
        hf_static_cache: also time HF ``generate`` on a static cache (once, with the first exit layer), its
            decoding step compiled (``compiled``) or eager (``eager``), beside the default dynamic-cache one.
        out_dir: write decode_cost_<shape>_<device>.json and .md here.
        rows_file: append each measurement here as one JSON line the moment it exists (the GPU suite's
            results file).
    """
    config = dict(locals())
    device = resolve_device(device)
    config["device"] = str(device)
    if forced and draft_vocab_size is not None:
        raise ConfigError("--draft_vocab_size needs --forced false: a restricted head cannot be forced to agree")
    if adapter_mlp < 0:
        raise ConfigError(f"--adapter_mlp must be >= 0 (0: no MLP), got {adapter_mlp}")
    if forced and max_draft + 1 not in ks:
        raise ConfigError(f"--ks must include max_draft + 1 = {max_draft + 1} for the prediction")
    results, name, static = [], None, None
    row = {"bench": "cost_model", "shape": None if base_model else shape, "model": base_model, "dtype": dtype,
           "device": str(device), "context": context}
    with torch_threads(threads or (1 if device.type == "cpu" else None)):
        for layer in as_list(exit_layer):
            model, name = build_cost_model(shape, base_model, layer, dtype, device, seed, draft_vocab_size,
                                           adapter_mlp)
            print(f"cost model: {name}, exit layer {layer}, {dtype} on {device}, context {context}", file=sys.stderr)
            with kernel_linears(model, kernel):
                costs = measure_costs(model, context, list(ks), repeats, device, seed)
                entry = {"exit_layer": layer, **costs}
                append_row(rows_file, {**row, "kind": "costs", **entry})
                if forced:
                    entry["forced"] = forced_speedup(model, costs, max_draft, context, runs, forced_new_tokens,
                                                     seed, device)
                    append_row(rows_file, {**row, "kind": "forced", "exit_layer": layer, **entry["forced"]})
            if hf_static_cache != "off" and static is None:
                n_new = forced_new_tokens or 1 + 18 * (max_draft + 1)
                static = static_cache_baseline(model, context, n_new, runs, seed, device,
                                               compiled=hf_static_cache == "compiled")
                forced_entry = entry.get("forced")
                if forced_entry and "tokens_per_s" in static:  # same prompt, same token count: comparable
                    static["speculative_over_static"] = forced_entry["tokens_per_s"]["speculative"] / static[
                        "tokens_per_s"]
                append_row(rows_file, {**row, "kind": "hf_static_cache", "exit_layer": layer, **static})
            results.append(entry)
            del model
            gc.collect()  # free one 7B model before building the next
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report = {
            "mode": "cost_model",
            "model": name,
            "shape": None if base_model else {"name": shape, **SHAPES[shape]},
            "config": config,
            "machine": machine_info(device),
            "layers": results,
            "hf_static_cache": static,
        }
    for title, header, rows in cost_tables(report):
        print_table(title, header, rows)
    if out_dir:
        write_outputs(out_dir, f"decode_cost_{'model' if base_model else shape}_{device.type}", report,
                      cost_markdown(report))
    return report


def build_cost_model(shape: str, base_model: str | None, exit_layer: int, dtype: str, device: torch.device,
                     seed: int, draft_vocab_size: int | None = None, adapter_mlp: int = 0):
    """(KangarooModel with an untrained adapter, description): random weights born on the device, or a model."""
    from kangaroo_lit.architectures import load_base_model, resolve_dtype
    from kangaroo_lit.model import KangarooModel

    torch_dtype = resolve_dtype(dtype)
    if base_model:
        from kangaroo_lit.embedded import resolve_path

        lm, name = load_base_model(resolve_path(base_model), torch_dtype).to(device), base_model
    else:
        with device:
            lm = random_base_model(shape_config(shape), torch_dtype, seed=seed)
        name = f"random {shape}"
    if draft_vocab_size is not None and not 0 < draft_vocab_size <= lm.config.vocab_size:
        raise ConfigError(f"--draft_vocab_size must be in 1..{lm.config.vocab_size}, got {draft_vocab_size}")
    draft_vocab = None if draft_vocab_size is None else torch.arange(draft_vocab_size)
    model = KangarooModel(lm, exit_layer, trainable_dtype=torch_dtype, draft_vocab=draft_vocab, adapter_mlp=adapter_mlp)
    return model.to(device).eval().requires_grad_(False), name


def time_interleaved(fns: dict[str, tuple[Callable[[], Any], Callable[[], None]]], repeats: int, warmup: int,
                     device: torch.device) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Seconds of each ``fn`` (its ``reset`` runs untimed after every call), round-robin over the functions
    so that a noisy neighbour slows them all alike: (medians, quartiles [q1, median, q3])."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + repeats):
        for name, (fn, reset) in fns.items():
            _, elapsed = timed(fn, device)
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
        linears = [lin for idx in range(model.exit_layer + 1, model.num_layers)
                   for lin in (model.layers[idx].self_attn.o_proj, model.layers[idx].mlp.down_proj)]
        if model.adapter.mlp is not None:  # the adapter's MLP adds to the residual too
            linears.append(model.adapter.mlp.down_proj)
        for lin in [*linears, model.adapter.self_attn.o_proj]:
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()


def predicted_speedup(c: float, v_next: float, max_draft: int, extra: float = 0.0) -> float:
    """``(K + 1) / (K c + v_{K+1} + extra)``: tokens per round over the round's cost in full steps."""
    return (max_draft + 1) / (max_draft * c + v_next + extra)


def random_prompt(model, context: int, seed: int, device: torch.device) -> torch.Tensor:
    """The random prompt of the forced-acceptance runs and the static-cache baseline (the same tokens)."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(3, model.config.vocab_size, (1, context), generator=g).to(device)


def forced_speedup(model, costs: dict[str, Any], max_draft: int, context: int, runs: int,
                   new_tokens: int | None, seed: int, device: torch.device) -> dict[str, Any]:
    """Realised speedup with forced acceptance (threshold 0, max_draft K) against the cost-model prediction.

    Speculative, vanilla and HF ``generate`` decode the same random prompt of ``context`` tokens to
    exactly ``n`` new tokens (no EOS), interleaved, ``runs`` times (medians). Each also decodes one
    token alone (prefill + first token); subtracting it gives the decode phase, which is what the
    prediction describes.
    """
    from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder, reference_model

    force_acceptance(model)
    k = max_draft
    n_new = new_tokens or 1 + 18 * (k + 1)
    prompt = random_prompt(model, context, seed, device)
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
    for rep in range(runs):
        for m in rotated(methods, rep):
            tokens[m], wall = run(m, n_new)
            walls[m].append(wall)
            prefill[m].append(run(m, 1)[1])
    med = {m: statistics.median(v) for m, v in walls.items()}
    med_prefill = {m: statistics.median(v) for m, v in prefill.items()}
    tps = {m: len(tokens[m]) / med[m] for m in methods}
    decode_tps = {m: (len(tokens[m]) - 1) / (med[m] - med_prefill[m]) for m in methods}
    c, v = costs["c"], costs["v"]
    predicted = predicted_speedup(c, v[k + 1], k)
    # The decoder also runs the shallow layers once more per round (the last draft's state for verification).
    predicted_refined = predicted_speedup(c, v[k + 1], k, extra=costs["c_shallow"])
    decode_only = decode_tps["speculative"] / decode_tps["vanilla"]
    r = results["speculative"]
    return {
        "max_draft": k,
        "new_tokens": {m: len(t) for m, t in tokens.items()},
        "prompt_tokens": context,
        "runs": runs,
        "wall_time_s": med,
        "prefill_wall_time_s": med_prefill,
        "tokens_per_s": tps,
        "decode_tokens_per_s": decode_tps,
        "accept_lengths": r.accept_lengths,
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


STATIC_WARMUP_CALLS = 3  # compilation on the first call; CUDA graphs ("reduce-overhead") record on the next ones


def static_cache_baseline(model, context: int, new_tokens: int, runs: int, seed: int, device: torch.device,
                          compiled: bool) -> dict[str, Any]:
    """HF ``generate`` on a static KV cache (decoding step compiled when ``compiled``) vs HF's default
    dynamic cache, eager: the same prompt and exactly ``new_tokens`` tokens each, ``runs`` interleaved
    measured calls (medians) after the warm-up calls, which are timed apart (``compile_and_warmup_s``).

    Tokens/s include the prefill, as the forced-acceptance run's do, so ``speculative_over_static`` compares
    like with like. A failure (no compiler, a graph break that ``fullgraph`` would refuse, ...) is reported
    in the result instead of raised: the cost model's own figures must not be lost to the baseline.
    """
    from transformers import CompileConfig

    from kangaroo_lit.decoding import reference_model

    prompt = random_prompt(model, context, seed, device)
    compile_note = "torch.compile (transformers' automatic compilation of the decoding step)" if compiled else \
        "off (eager static cache)"
    options: dict[str, Any] = {"cache_implementation": "static"}
    if compiled and device.type != "cuda":
        config = CompileConfig()
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told
        options["compile_config"] = config
    elif not compiled:
        options["disable_compile"] = True
    result: dict[str, Any] = {"cache": "static", "compile": compile_note, "compile_requested": compiled,
                              "new_tokens": new_tokens,
                              "prompt_tokens": context, "runs": runs}
    try:
        with reference_model(model) as lm, torch.inference_mode():
            lm.generation_config.eos_token_id = None  # exactly new_tokens tokens, no EOS

            def static_generate() -> tuple[list[int], float]:
                out, wall = timed(lambda: lm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                                      max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                                      pad_token_id=0, eos_token_id=None, **options), device)
                return out[0, context:].tolist(), wall

            warmups = [static_generate()[1] for _ in range(STATIC_WARMUP_CALLS)]
            result["compiled"] = hasattr(lm, "_compiled_call")  # transformers set it when it compiled
            hf_generate(lm, prompt, new_tokens, None)  # the eager baseline's warm-up
            static_walls, eager_walls = [], []
            for _ in range(max(1, runs)):
                static_tokens, wall = static_generate()
                static_walls.append(wall)
                eager_tokens, wall = hf_generate(lm, prompt, new_tokens, None)
                eager_walls.append(wall)
    except Exception as err:  # noqa: BLE001 - reported in the result (see the docstring)
        return {**result, "error": f"{type(err).__name__}: {err}"}
    finally:
        if compiled:
            torch._dynamo.reset()  # drop the compiled graphs (and their CUDA-graph memory) with the model
    static_wall, eager_wall = statistics.median(static_walls), statistics.median(eager_walls)
    return {**result, "compile_and_warmup_s": sum(warmups), "warmup_walls_s": warmups,
            "wall_time_s": static_wall, "tokens_per_s": len(static_tokens) / static_wall,
            "eager_wall_time_s": eager_wall, "eager_tokens_per_s": len(eager_tokens) / eager_wall,
            "static_over_eager": eager_wall / static_wall, "identical_to_eager": static_tokens == eager_tokens}


# --------------------------------------------------------------------------------------------------
# Tables
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
                         f"{f['accept_rate']:.3f}", str(f["identical"]), f"{f['predicted']:.3f}",
                         f"{f['predicted_refined']:.3f}", f"{f['realised']:.3f}", f"{f['realised_decode_only']:.3f}",
                         f"{f['realised_over_predicted']:.3f}"])
        tables.append(("Forced acceptance (threshold 0): realised vs predicted (K+1)/(K c + v_{K+1})", header, rows))
    static = report.get("hf_static_cache")
    if static:
        tables.append(static_table(static))
    return tables


def static_table(static: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """The HF baselines: static cache (compiled or not) beside the default dynamic cache, eager."""
    title = (f"HF generate baselines ({static['new_tokens']} new tokens after {static['prompt_tokens']}; tokens/s "
             "include the prefill; compilation and warm-up timed apart)")
    header = ["cache", "compile", "tok/s", "compile + warm-up (s)", "static / eager", "identical",
              "speculative / static"]
    if "error" in static:
        return title, header, [["static", static["compile"], "error", "", "", "", static["error"][:120]]]
    ratio = static.get("speculative_over_static")
    rows = [["dynamic (HF default)", "off", f"{static['eager_tokens_per_s']:.1f}", "", "1.000", "", ""],
            ["static", static["compile"] + (" (asked for, but nothing compiled)"
                                            if static["compile_requested"] and not static.get("compiled") else ""),
             f"{static['tokens_per_s']:.1f}", f"{static['compile_and_warmup_s']:.1f}",
             f"{static['static_over_eager']:.3f}", str(static["identical_to_eager"]),
             "" if ratio is None else f"{ratio:.3f}"]]
    return title, header, rows


def cost_markdown(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["config"]
    out = [f"{report['model']} ({c['dtype']} on {m['gpu'] or m['cpu']}, {m['torch_threads']} torch threads), "
           f"context {c['context']} tokens, median of {c['repeats']} repeats; forced acceptance: median of "
           f"{c['runs']} runs; torch {m['torch']}, transformers {m['transformers']}, {m['date']}."]
    for title, header, rows in cost_tables(report):
        out += ["", f"{title}:", "", markdown_table(header, rows)]
    return "\n".join(out) + "\n"
