"""``kangaroo-lit generate``: decode prompts with the self-speculative decoder.

    kangaroo-lit generate --artifact runs/tiny/artifact --prompt "What is 12 plus 7?" --format instruction
    kangaroo-lit generate --base_model ../shared/models/stories260k-hf --exit_layer 1 --prompt "Once upon a time"
    kangaroo-lit generate --config generate.yaml --prompt "Once upon a time" --json   # a later flag wins

Without ``--artifact``, ``--base_model`` + ``--exit_layer`` decode with a freshly initialised adapter
(the untrained early exit): the machinery on any supported model, lossless but with little acceleration.
The text streams to stdout and a one-line summary follows (stderr); ``--json`` prints one JSON object
per prompt on stdout (one line each, written as each prompt finishes) and nothing else there (DESIGN §4b).
Every prompt is checked (it fits the model's context with ``--max_new_tokens``) before the first is decoded.

The arguments are the fields of ``GenerateOptions`` (jsonargparse, LightningCLI's underscore style):
any of them may come from ``--config FILE``; ``--print_config`` prints them as YAML and exits. The
switches ``--json`` and ``--compare_vanilla`` also take a value (``--json false``, or ``--no_json``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch

from kangaroo_lit import cli_scaffold
from kangaroo_lit.errors import ConfigError
from kangaroo_lit.settings import DecodingSettings

PROG = "kangaroo-lit generate"


@dataclass(frozen=True)
class GenerateOptions:
    """What to decode, with which model, and how.

    Args:
        artifact: directory written by ``kangaroo-lit export`` (the trained draft).
        base_model: base model HF name or local path. Without --artifact: the model to decode with an
            untrained adapter (needs --exit_layer); with --artifact: overrides the base it records.
        exit_layer: exit layer L for a plain --base_model (an artifact records its own).
        prompt: the prompt text, taken literally (or --prompt_file); an empty (or blank) prompt decodes from the
            tokenizer's BOS token, as HF generate does without input.
        prompt_file: .txt (one prompt per line) or JSONL/JSON with prompt/instruction fields.
        format: raw: the text as is; instruction: the training template (### Instruction: ...);
            chat: the tokenizer's chat template (falls back to instruction).
        max_new_tokens: tokens to generate per prompt (>= 1; prompt + these must fit the model's context).
        temperature: 0 = greedy, else lossless speculative sampling (>= 0).
        top_p: nucleus sampling, in (0, 1] (1 = off).
        top_k: top-k sampling, >= 0 (0 = off).
        threshold: second early exit: a draft below this top-1 probability ends the round; in [0, 1]. Default:
            what the artifact records (the cost model's sizing from ``bench threshold_curve --record``, else its
            training run's decoding settings), else 0.6.
        max_draft: most drafts per round (>= 1); default as for --threshold, else 6.
        prompt_lookup: most tokens a round copies from an earlier occurrence of the context's last n-gram
            (prompt lookup; 0 = off: the adapter drafts every round).
        drafter: adapter (the trained draft, a chain; with --prompt_lookup, lookup where it matches), tree (the
            trained draft, a tree of candidates sized by the cost model; with --prompt_lookup, likewise) or lookup
            (prompt lookup alone, no draft: a round without a match is a plain step).
        skip_below: a round whose first draft's confidence is below this verifies no draft (a plain step); in
            [0, 1], 0 = off (break-even is about v_2 - 1 of bench cost_model); default as for --threshold, else 0.
        tree_width: --drafter tree: candidates per expanded node and nodes expanded per level (>= 1).
        tree_nodes: --drafter tree: most nodes verified a round (>= 1; the cost model picks how many).
        tree_depth: --drafter tree: most levels below the last committed token (>= 1).
        cost_model: a ``bench cost_model`` JSON report (decode_cost_*.json) of this device to size trees and
            lookup windows by (default: the built-in table for the device and --kernel).
        lookup_window: with --prompt_lookup: cost (each round verifies as many copied tokens as the cost model
            and the running acceptance say pay) or fixed (all the match offers, up to --prompt_lookup).
        kernel: linear layers over <= 8 rows: ``eager`` (``F.linear``) or ``streaming`` (a CPU float32 kernel
            that verifies several tokens for about the price of one; compiled on first use).
        compare_vanilla: also decode with the vanilla loop: speedup and whether outputs are identical.
        dtype: dtype of the whole model.
        device: torch device (cpu, cuda, cuda:N); auto = cuda when available, else cpu.
        seed: sampling seed.
        threads: torch CPU threads; default 1 for models under 20M parameters, else every core.
        json: print one JSON object per prompt on stdout (one line each, as each finishes) instead of text
            + summary.
    """

    artifact: str | None = None
    base_model: str | None = None
    exit_layer: int | None = None
    prompt: str | None = None  # parsed as plain text (parse): "null" or "# Title" stay text
    prompt_file: str | None = None
    format: Literal["raw", "instruction", "chat"] = "raw"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    threshold: float | None = None
    max_draft: int | None = None
    prompt_lookup: int = 0
    drafter: Literal["adapter", "tree", "lookup"] = "adapter"
    skip_below: float | None = None
    tree_width: int = 4
    tree_nodes: int = 7
    tree_depth: int = 6
    cost_model: str | None = None
    lookup_window: Literal["cost", "fixed"] = "cost"
    kernel: Literal["eager", "streaming"] = "eager"
    compare_vanilla: bool = False
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    seed: int = 0
    threads: int | None = None
    json: bool = False

    def __post_init__(self) -> None:
        if self.artifact is None and self.base_model is None:
            raise ConfigError("give --artifact, or --base_model with --exit_layer")
        if self.artifact is None and self.exit_layer is None:
            raise ConfigError("--base_model without --artifact needs --exit_layer")
        if (self.prompt is None) == (self.prompt_file is None):
            raise ConfigError("give exactly one of --prompt and --prompt_file")
        if self.exit_layer is not None and self.exit_layer < 0:
            raise ConfigError(f"--exit_layer must be >= 0, got {self.exit_layer}")
        _ = self.decoding  # the project's one set of decoding rules, worded as this command's options
        self._check_device()

    @property
    def decoding(self) -> DecodingSettings:
        """The decoding settings of these options without an artifact (checked: a bad value is a one-line
        ConfigError)."""
        return self.decoding_for(None)

    def decoding_for(self, manifest: dict[str, Any] | None) -> DecodingSettings:
        """The decoding settings of these options with ``manifest``'s recorded chain sizing (threshold,
        max_draft, skip_below) where an option was not given."""
        from kangaroo_lit.decoding.session import recorded_sizing

        sizing = recorded_sizing(manifest, threshold=self.threshold, max_draft=self.max_draft,
                                 skip_below=self.skip_below)
        return DecodingSettings.for_options(
            "--", max_new_tokens=self.max_new_tokens, prompt_lookup=self.prompt_lookup, drafter=self.drafter,
            **sizing, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, kernel=self.kernel,
            tree_width=self.tree_width, tree_nodes=self.tree_nodes, tree_depth=self.tree_depth,
            cost_model=self.cost_model, lookup_window=self.lookup_window)

    def _check_device(self) -> None:
        if self.device == "auto":
            return
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"--device {self.device!r} is not a torch device; use auto, cpu, cuda or "
                              "cuda:N") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"--device {self.device}: CUDA is not available in this torch build/machine; "
                                  "use --device cpu")
            count = torch.cuda.device_count()
            if device.index is not None and device.index >= count:
                raise ConfigError(f"--device {self.device}: this machine has {count} CUDA device(s): "
                                  f"cuda:0..cuda:{count - 1}")
        elif device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"--device {self.device}: MPS is not available in this torch build/machine; "
                              "use --device cpu")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def parse(argv: list[str] | None = None) -> dict[str, Any]:
    """The parsed fields of :class:`GenerateOptions` (``--config`` files applied, then the flags after them).

    ``--prompt`` is plain text, never YAML (``null`` stays the word), and absent (None) is told apart from
    an empty prompt.
    """
    return cli_scaffold.parse(cli_scaffold.build_parser(GenerateOptions, PROG, text=("prompt",)), argv)


def load_model(opts: GenerateOptions):
    """The :class:`~kangaroo_lit.decoding.session.LoadedForDecoding` of an artifact or a plain HF model (the
    project's one loader, :func:`~kangaroo_lit.decoding.session.load_for_decoding`)."""
    from kangaroo_lit.decoding.session import load_for_decoding

    return load_for_decoding(artifact=opts.artifact, base_model=opts.base_model, exit_layer=opts.exit_layer,
                             dtype=opts.dtype, device=opts.torch_device)


def prompt_entries(opts: GenerateOptions) -> list[tuple[str, dict]]:
    """``(where, entry)`` for every prompt: ``--prompt`` or each line/element of ``--prompt_file``."""
    from kangaroo_lit.data.prompt_file import load_prompt_entries

    if opts.prompt_file:
        return load_prompt_entries(opts.prompt_file)
    return [("--prompt", {"raw": opts.prompt})]


def prompt_texts(opts: GenerateOptions, tokenizer, entries: list[tuple[str, dict]] | None = None) -> list[str]:
    """The text fed to the model for each prompt, rendered as ``--format`` says."""
    from kangaroo_lit.data.prompt_file import render_prompt

    texts = []
    for _, entry in prompt_entries(opts) if entries is None else entries:
        if opts.format != "raw" and "raw" in entry:
            entry = {"instruction": entry["raw"], "context": ""}
        texts.append(render_prompt(entry, tokenizer, use_chat_template=opts.format == "chat"))
    return texts


def encode_prompt(tokenizer, text: str, where: str) -> torch.Tensor:
    """(1, T) ids of a rendered prompt; an empty or blank one is the BOS token alone (HF ``generate``'s start
    without input), or a ConfigError naming ``where`` when the tokenizer has no BOS."""
    if text.strip():
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1]:
            return ids
    if tokenizer.bos_token_id is None:
        raise ConfigError(f"{where}: the prompt is empty and the tokenizer has no BOS token to start from; "
                          "give a prompt")
    return torch.tensor([[tokenizer.bos_token_id]])


def decode_one(opts: GenerateOptions, model, tokenizer, ids: torch.Tensor, stream: bool,
               decoding: DecodingSettings) -> dict[str, Any]:
    """Decode one tokenized prompt (1, T) with ``decoding`` (``opts.decoding_for`` the loaded artifact); the
    JSON object of DESIGN §4b."""
    from kangaroo_lit.decoding import SelfSpeculativeDecoder, VanillaDecoder

    device = opts.torch_device
    ids = ids.to(device)
    eos = tokenizer.eos_token_id
    sampling = dict(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k)
    printed = {"tokens": [], "text": ""}

    def on_round(info) -> None:
        printed["tokens"].extend(info.emitted)
        full = tokenizer.decode(printed["tokens"], skip_special_tokens=True)
        sys.stdout.write(full[len(printed["text"]):])
        sys.stdout.flush()
        printed["text"] = full

    decoder = SelfSpeculativeDecoder(model, drafter=decoding.make_drafter(model),
                                     on_round=on_round if stream else None)
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    result = decoder.generate(ids, opts.max_new_tokens, eos, generator=gen, **sampling)
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
    if opts.compare_vanilla:
        gen = torch.Generator(device=device).manual_seed(opts.seed)
        vanilla = VanillaDecoder(model).generate(ids, opts.max_new_tokens, eos, generator=gen, **sampling)
        out["vanilla_tokens_per_s"] = vanilla.tokens_per_s
        out["speedup"] = result.tokens_per_s / vanilla.tokens_per_s if vanilla.tokens_per_s else None
        out["identical"] = (result.tokens == vanilla.tokens) if opts.temperature == 0 else None
    return out


def summary_line(out: dict[str, Any]) -> str:
    line = (f"[{out['new_tokens']} tokens, {out['tokens_per_s']:.1f} tokens/s, MAT {out['mat']:.2f}, "
            f"acceptance {out['accept_rate']:.1%}")
    if "speedup" in out:
        same = {True: "identical to vanilla", False: "DIFFERS from vanilla", None: "sampling"}[out["identical"]]
        line += f", speedup {out['speedup']:.2f}x over vanilla ({out['vanilla_tokens_per_s']:.1f} tokens/s), {same}"
    return line + "]"


def generate(opts: GenerateOptions) -> int:
    """Decode every prompt of ``opts``; 0 on success.

    Every prompt is read, rendered, tokenized and checked against the model's context before the first
    is decoded, so a bad prompt stops the run before any work is lost; each result is written (and
    flushed) as soon as its prompt is done.

    Raises:
        KangarooError: a bad option, prompt file, model or artifact (``main`` prints it as one line).
    """
    from kangaroo_lit.data.prompt_file import check_prompt_lengths
    from kangaroo_lit.threads import apply_threads

    entries = prompt_entries(opts)  # a malformed prompt file fails before a model is loaded
    loaded = load_model(opts)
    model, tokenizer = loaded.model, loaded.tokenizer
    decoding = opts.decoding_for(loaded.manifest)
    if next(model.parameters()).device.type == "cpu":
        apply_threads(sum(p.numel() for p in model.parameters()), opts.threads, decoding=True)
    texts = prompt_texts(opts, tokenizer, entries)
    encoded = [encode_prompt(tokenizer, text, where) for (where, _), text in zip(entries, texts)]
    check_prompt_lengths([(where, ids.shape[1]) for (where, _), ids in zip(entries, encoded)], opts.max_new_tokens,
                         getattr(model.config, "max_position_embeddings", None))
    stream = not opts.json and not opts.compare_vanilla
    with cli_scaffold.kernel_linears(model, opts.kernel):
        decode_all(opts, model, tokenizer, encoded, stream, decoding)
    return 0


def decode_all(opts: GenerateOptions, model, tokenizer, encoded: list[torch.Tensor], stream: bool,
               decoding: DecodingSettings) -> None:
    """Decode each prompt with ``decoding`` and write its result as soon as it is done."""
    for ids in encoded:
        out = decode_one(opts, model, tokenizer, ids, stream, decoding)
        if opts.json:
            sys.stdout.write(json.dumps(out) + "\n")
        else:
            if not stream:
                sys.stdout.write(out["text"])
            sys.stdout.write("\n")
        sys.stdout.flush()
        if not opts.json:
            print(summary_line(out), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """``kangaroo-lit generate``: 0 on success, 2 with one ``error:`` line for a user's mistake."""
    cfg = parse(argv)
    return cli_scaffold.run_reporting(lambda: generate(GenerateOptions(**cfg)))
