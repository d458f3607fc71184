"""The Spec-Bench run: load once, decode every question with every method, write as it goes, resume.

Per run and question, the methods take turns (their order rotates from question to question, so none
always runs first or last); each method answers every turn of the question, a later turn rendered after
its *own* earlier answers. The question's answer line is then appended to each method's file. A run
that was interrupted resumes from the files: questions a method has answered are not redone
(:mod:`~kangaroo_lit.specbench.answers`), and ``specbench.json`` in the output folder makes sure the
answers already there were made with the same settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kangaroo_lit.architectures import stop_token_ids
from kangaroo_lit.bench.common import machine_info, print_table, resolve_device, rotated, torch_threads, write_outputs
from kangaroo_lit.cli_scaffold import kernel_linears
from kangaroo_lit.decoding.sampling import SamplingConfig
from kangaroo_lit.errors import ConfigError
from kangaroo_lit.kernels import MAX_ROWS
from kangaroo_lit.settings import DECODING_ANSWER_FIELDS, DecodingSettings
from kangaroo_lit.specbench import answers as answer_files
from kangaroo_lit.specbench import report
from kangaroo_lit.specbench.conversation import PromptRenderer, Template
from kangaroo_lit.specbench.methods import (
    DEFAULT_METHODS,
    METHOD_ORDER,
    TRAINED_METHODS,
    Method,
    TurnResult,
    build_methods,
)
from kangaroo_lit.specbench.questions import Question, load_questions, select_questions

DEFAULT_BASE_MODEL = "embedded:tiny-llama"
DEFAULT_EXIT_LAYER = 1  # Kangaroo's "exit at layer 2"; the embedded model's configs/tiny.yaml
STATE_FILE = "specbench.json"
# Settings that change what an answer is or how fast it came: answers (and timings) made with others
# cannot be resumed into the same files, or one summary would mix two configurations. The decoding
# settings' own fields all count (the methods replace its drafter choice).
ANSWER_SETTINGS = ("questions_sha256", "model", "artifact", "exit_layer", "dtype", "template", "seed",
                   "pld_num_tokens", "pld_ngram_size", "turns",
                   *(f for f in DECODING_ANSWER_FIELDS if f != "drafter"))
# Settings whose default changed when they were added: a folder that predates one was made with this value.
LEGACY_VALUES = {"lookup_window": "fixed"}
# Methods whose drafts come from prompt lookup (they need --prompt_lookup >= 1) or from the adapter.
LOOKUP_METHODS = ("lookup", "kangaroo_lookup", "kangaroo_tree_lookup")
ADAPTER_METHODS = ("kangaroo", "kangaroo_lookup", "early_exit")
TREE_METHODS = ("kangaroo_tree", "kangaroo_tree_lookup")


@dataclass(frozen=True)
class SpecBenchSettings:
    """Everything ``kangaroo-lit specbench`` takes (see :func:`kangaroo_lit.specbench.cli.specbench`)."""

    question_file: str
    artifact: str | None
    base_model: str | None
    exit_layer: int | None
    template: Template
    subtasks: tuple[str, ...] | None
    limit: int | None
    turns: int | None
    methods: tuple[str, ...] | None
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    threshold: float | None
    max_draft: int | None
    pld_num_tokens: int
    pld_ngram_size: int
    prompt_lookup: int
    skip_below: float | None
    tree_width: int
    tree_nodes: int
    tree_depth: int
    cost_model: str | None
    kernel: str
    dtype: str
    device: str
    runs: int
    warmup: int
    threads: int | None
    out_dir: str
    overwrite: bool
    progress: bool = True
    lookup_window: str = "cost"

    def check(self) -> None:
        """Raise :class:`ConfigError` for values out of range (before anything is loaded)."""
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.runs < 1:
            raise ConfigError(f"--runs must be >= 1, got {self.runs}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0 (questions), got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.turns is not None and self.turns < 1:
            raise ConfigError(f"--turns must be >= 1, got {self.turns}")
        methods = self.methods or METHOD_ORDER
        # The project's one set of decoding rules, for each kind of drafter the methods use.
        for drafter, used in (("adapter", ADAPTER_METHODS), ("lookup", LOOKUP_METHODS), ("tree", TREE_METHODS)):
            if any(m in used for m in methods):
                self.decoding(drafter)
        if self.pld_num_tokens < 1 or self.pld_ngram_size < 1:
            raise ConfigError("--pld_num_tokens and --pld_ngram_size must be >= 1")
        if self.exit_layer is not None and self.exit_layer < 0:
            raise ConfigError(f"--exit_layer must be >= 0, got {self.exit_layer}")
        try:  # every method samples alike (HF's too)
            _ = self.sampling
        except ValueError as err:
            raise ConfigError(f"--{err}") from None
        unknown = [m for m in self.methods or () if m not in METHOD_ORDER]
        if unknown:
            raise ConfigError(f"--methods: unknown method(s) {', '.join(map(repr, unknown))}; allowed: "
                              f"{', '.join(METHOD_ORDER)}")

    def decoding(self, drafter: str) -> DecodingSettings:
        """The decoding settings of a method drafting with ``drafter`` (checked; errors name the options).

        ``--threshold`` / ``--max_draft`` / ``--skip_below`` left open are checked at the defaults here (an
        artifact's recorded values, which the run then uses, were checked when it was trained)."""
        defaults = DecodingSettings()
        return DecodingSettings.for_options(
            "--", max_new_tokens=self.max_new_tokens,
            threshold=defaults.threshold if self.threshold is None else self.threshold,
            max_draft=defaults.max_draft if self.max_draft is None else self.max_draft,
            prompt_lookup=self.prompt_lookup, drafter=drafter,
            skip_below=defaults.skip_below if self.skip_below is None else self.skip_below,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, kernel=self.kernel,
            tree_width=self.tree_width, tree_nodes=self.tree_nodes, tree_depth=self.tree_depth,
            cost_model=self.cost_model, lookup_window=self.lookup_window)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


# --------------------------------------------------------------------------------------------------
# The model
@dataclass
class Draft:
    """Where the model comes from and how it drafts (resolved before anything heavy is loaded)."""

    base_model: str  # as given or recorded (a Hub name, a path, or embedded:...)
    artifact: str | None
    exit_layer: int
    threshold: float
    max_draft: int
    skip_below: float


def resolve_draft(s: SpecBenchSettings) -> Draft:
    """The base model, exit layer and drafting rule: the artifact's, else ``--base_model`` + ``--exit_layer``
    (default the embedded model at exit layer 1). ``--threshold`` / ``--max_draft`` / ``--skip_below`` default
    to the artifact's recorded sizing or training settings, else :class:`DecodingSettings`' (0.6 / 6 / 0)."""
    from kangaroo_lit.decoding.session import recorded_sizing

    manifest = None
    if s.artifact:
        from kangaroo_lit.artifact import read_manifest

        manifest = read_manifest(s.artifact)
        if s.exit_layer is not None and s.exit_layer != manifest["exit_layer"]:
            raise ConfigError(f"--exit_layer {s.exit_layer}: the artifact {s.artifact} was trained for exit layer "
                              f"{manifest['exit_layer']} (drop --exit_layer)")
    sizing = recorded_sizing(manifest, threshold=s.threshold, max_draft=s.max_draft, skip_below=s.skip_below)
    return Draft(base_model=s.base_model or (manifest["base_model"] if manifest else DEFAULT_BASE_MODEL),
                 artifact=str(Path(s.artifact).resolve()) if s.artifact else None,
                 exit_layer=manifest["exit_layer"] if manifest else (s.exit_layer if s.exit_layer is not None
                                                                     else DEFAULT_EXIT_LAYER),
                 **sizing)


def load_model(draft: Draft, dtype: str, device: torch.device):
    """``(KangarooModel in eval mode, tokenizer)``: the artifact's trained draft, or an untrained adapter
    (the project's one loader, :func:`~kangaroo_lit.decoding.session.load_for_decoding`)."""
    from kangaroo_lit.decoding.session import load_for_decoding

    loaded = load_for_decoding(artifact=draft.artifact, base_model=draft.base_model,
                               exit_layer=None if draft.artifact else draft.exit_layer, dtype=dtype, device=device)
    return loaded.model, loaded.tokenizer


# --------------------------------------------------------------------------------------------------
# The output folder
def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_out_dir(out_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Answers already in ``out_dir`` must come from the same settings (``specbench.json`` says which);
    checked before the model is loaded. A setting the folder does not record (added to kangaroo_lit after
    it was written) matches when it is at its default, the behaviour that folder's answers had.

    Raises:
        ConfigError: they were made with other settings (listed), and ``overwrite`` is not given.
    """
    state = out_dir / STATE_FILE
    if overwrite or not state.is_file():
        return
    try:
        saved = json.loads(state.read_text()).get("answer_settings", {})
    except (json.JSONDecodeError, AttributeError):
        raise ConfigError(f"{state} is not a specbench state file; choose another --out_dir") from None
    # A setting newer than the folder: its answers were made as the setting's value then (LEGACY_VALUES) makes
    # them, else as its default does.
    defaults = {**asdict(DecodingSettings()), **LEGACY_VALUES}

    def same(key: str) -> bool:
        if key not in saved:
            return settings[key] == defaults.get(key)
        return saved[key] == settings[key]

    differ = [f"{k} {saved.get(k, 'absent')!r} there, {settings[k]!r} now" for k in ANSWER_SETTINGS if not same(k)]
    if differ:
        raise ConfigError(f"--out_dir {out_dir} holds answers made with other settings ({'; '.join(differ)}); "
                          "choose another --out_dir, or pass --overwrite to delete them")


def prepare_out_dir(out_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Delete earlier outputs with ``overwrite``; record ``settings`` in ``specbench.json``."""
    if overwrite:
        remove_outputs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STATE_FILE).write_text(json.dumps({"answer_settings": settings}, indent=2) + "\n")


def remove_outputs(out_dir: Path) -> None:
    """Delete what a specbench run writes (answer files, summaries, state), nothing else."""
    for run_dir in out_dir.glob("run_*"):
        for f in run_dir.glob("*.jsonl*"):
            f.unlink()
        with contextlib.suppress(OSError):
            run_dir.rmdir()
    for name in (STATE_FILE, "summary.json", "summary.md", "summary.png"):
        (out_dir / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Progress and messages
# Two transformers warnings that are wrong for this command: its own early-exit assistant passes a
# generation config and arguments together (transformers' code, not ours), and the tokenizer warns about
# prompts longer than the model's context, which the renderer then cuts from the left (and counts).
QUIET = {
    "transformers.generation.utils": "Passing `generation_config` together with generation-related arguments",
    "transformers.tokenization_utils_base": "Token indices sequence length is longer than the specified maximum",
}


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Drop the messages of :data:`QUIET` (only those) while the benchmark runs."""
    filters = [(logging.getLogger(name), _DropMessage(text)) for name, text in QUIET.items()]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)

@contextlib.contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[Any]:
    """A progress bar on stderr (rich when installed, else tqdm); ``bar(advance, text)`` moves it."""
    if not enabled or total == 0:
        yield lambda advance, text: None
        return
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        from tqdm import tqdm

        with tqdm(total=total, file=sys.stderr, unit="question") as bar:
            def step(advance: int, text: str) -> None:
                bar.set_postfix_str(text)
                bar.update(advance)

            yield step
        return
    columns = (TextColumn("specbench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("", total=total)
        yield lambda advance, text: bar.update(task, advance=advance, description=text)


# --------------------------------------------------------------------------------------------------
# Decoding
class Conversations:
    """Decodes a question's turns with one method, each turn after the method's own earlier answers."""

    def __init__(self, renderer: PromptRenderer, tokenizer, max_new_tokens: int, sampling: SamplingConfig,
                 seed: int, device: torch.device) -> None:
        self.renderer, self.tokenizer = renderer, tokenizer
        self.max_new_tokens, self.sampling, self.seed, self.device = max_new_tokens, sampling, seed, device

    def turn_seed(self, question: Question, turn: int) -> int:
        """One seed per question and turn: the same for every method, every run (Spec-Bench seeds each
        choice alike in every run) and a redone question (so a resumed sampling run matches too)."""
        return (self.seed * 1_000_003 + question.question_id * 101 + turn) % (2**63)

    def answer(self, method: Method, question: Question, turns: int | None = None):
        """``(texts, results, prompt_tokens, prompt_cut)`` of the first ``turns`` turns (default all)."""
        texts: list[str] = []
        results: list[TurnResult] = []
        lengths, cuts = [], []
        # A question has as many turns as it has: --turns 2 asks for two where there are two.
        for t in range(len(question.turns) if turns is None else min(turns, len(question.turns))):
            prompt = self.renderer.encode(question.turns[: t + 1], texts)
            result = method.generate(prompt.ids.to(self.device), self.max_new_tokens, self.sampling,
                                     self.turn_seed(question, t))
            # Spec-Bench keeps the decoded answer, special tokens dropped and stripped, and feeds it back
            texts.append(self.tokenizer.decode(result.tokens, skip_special_tokens=True).strip())
            results.append(result)
            lengths.append(prompt.tokens)
            cuts.append(prompt.cut)
        return texts, results, lengths, cuts


def model_name(draft: Draft) -> str:
    source = draft.artifact or draft.base_model
    return Path(source.split(":", 1)[-1]).name or source


def run_specbench(s: SpecBenchSettings) -> dict[str, Any]:
    """Run (or resume) the benchmark and write the answers, ``summary.json``, ``summary.md`` and ``summary.png``;
    returns the summary report.

    Raises:
        KangarooError: a bad setting, question file, model or artifact, or an output folder of other settings.
    """
    s.check()
    questions = select_questions(load_questions(s.question_file), s.subtasks, s.limit)
    draft = resolve_draft(s)
    device = resolve_device(s.device)
    out_dir = Path(s.out_dir)
    settings = {"questions_sha256": file_sha256(s.question_file), "model": draft.base_model,
                "artifact": draft.artifact, "exit_layer": draft.exit_layer, "dtype": s.dtype, "template": s.template,
                "max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                "seed": s.seed, "threshold": draft.threshold, "max_draft": draft.max_draft,
                "pld_num_tokens": s.pld_num_tokens, "pld_ngram_size": s.pld_ngram_size, "turns": s.turns,
                "prompt_lookup": s.prompt_lookup, "kernel": s.kernel, "skip_below": draft.skip_below,
                "tree_width": s.tree_width, "tree_nodes": s.tree_nodes, "tree_depth": s.tree_depth,
                "cost_model": file_sha256(s.cost_model) if s.cost_model else None, "lookup_window": s.lookup_window}
    names = [m for m in METHOD_ORDER if m in (s.methods or DEFAULT_METHODS)]
    untrained = {"early_exit"} if draft.artifact else set(TRAINED_METHODS)
    names = [m for m in names if m not in untrained]
    if "vanilla" not in names:
        names.insert(0, "vanilla")  # the baseline every speedup divides by
    check_out_dir(out_dir, settings, s.overwrite)
    with (torch_threads(s.threads or (1 if device.type == "cpu" else None)), quiet_transformers(),
          contextlib.ExitStack() as stack):
        model, tokenizer = load_model(draft, s.dtype, device)
        patched = stack.enter_context(kernel_linears(model, s.kernel))
        if patched:
            print(f"kernel: {patched} linear layers through the streaming kernel (inputs of <= {MAX_ROWS} rows)",
                  file=sys.stderr)
        renderer = PromptRenderer(tokenizer, s.template, getattr(model.config, "max_position_embeddings", None),
                                  s.max_new_tokens)
        prepare_out_dir(out_dir, settings, s.overwrite)
        eos = stop_token_ids(tokenizer, model.causal_lm)
        methods = build_methods(model, eos, names, trained=draft.artifact is not None, threshold=draft.threshold,
                                max_draft=draft.max_draft, pld_num_tokens=s.pld_num_tokens,
                                pld_ngram_size=s.pld_ngram_size, prompt_lookup=s.prompt_lookup,
                                skip_below=draft.skip_below, tree=s.decoding("tree"),
                                lookup_cost=s.decoding("adapter").lookup_cost(model))  # None at --prompt_lookup 0
        conv = Conversations(renderer, tokenizer, s.max_new_tokens, s.sampling, s.seed, device)
        model_id = {m.name: f"{model_name(draft)}-{m.name}-{s.dtype}-temp-{s.temperature:g}" for m in methods}
        done = {run: {m.name: answer_files.read_answers(answer_files.answer_path(out_dir, run, m.name))
                      for m in methods} for run in range(1, s.runs + 1)}
        todo = [(run, i, q) for run in done for i, q in enumerate(questions)
                if any(q.question_id not in done[run][m.name] for m in methods)]
        skipped = len(questions) * s.runs - len(todo)
        if skipped:
            print(f"resuming: {skipped} of {len(questions) * s.runs} questions already answered in {out_dir}",
                  file=sys.stderr)
        if todo:
            for q in questions[: s.warmup]:  # not recorded: first calls pay for allocation and lazy imports
                for m in methods:
                    conv.answer(m, q, turns=1)
        with progress_bar(len(todo), s.progress) as bar:
            for run, i, q in todo:
                for m in rotated(methods, (run - 1) * len(questions) + i):
                    if q.question_id in done[run][m.name]:
                        continue
                    texts, results, lengths, cuts = conv.answer(m, q, turns=s.turns)
                    record = answer_files.make_record(q, model_id[m.name], run, texts, results, lengths, cuts)
                    answer_files.append_answer(answer_files.answer_path(out_dir, run, m.name), record)
                    done[run][m.name][q.question_id] = record
                bar(1, f"run {run} {q.subtask} q{q.question_id}")
        order = [q.question_id for q in questions]
        for run in done:
            for m in methods:
                answer_files.reorder(answer_files.answer_path(out_dir, run, m.name), order)
        summary = report.summarize(done, questions, [m.name for m in methods], greedy=s.sampling.greedy)
        full = {
            "model": draft.base_model,
            "model_name": model_name(draft),
            "artifact": draft.artifact,
            "exit_layer": draft.exit_layer,
            "threshold": draft.threshold,
            "max_draft": draft.max_draft,
            "template": renderer.template,
            "context_length": getattr(model.config, "max_position_embeddings", None),
            "settings": {k: v for k, v in asdict(s).items() if k != "progress"},
            "machine": machine_info(device),
            "method_descriptions": {m.name: m.description for m in methods},
            "answer_files": {run: {m.name: str(answer_files.answer_path(out_dir, run, m.name)) for m in methods}
                             for run in done},
            **summary,
        }
    write_report(full, out_dir)
    return full


def heading(full: dict[str, Any]) -> str:
    """One paragraph: what was measured, where and how."""
    st, m = full["settings"], full["machine"]
    n = full["results"]["overall"]["vanilla"]["questions"]
    sampling = "greedy" if st["temperature"] == 0 else f"temperature {st['temperature']:g}"
    return (f"Spec-Bench on `{full['artifact'] or full['model']}` (exit layer {full['exit_layer']}, threshold "
            f"{full['threshold']:g}, max_draft {full['max_draft']}), {n} questions "
            f"({', '.join(g for g in full['groups'] if g != 'overall')}), template `{full['template']}`, {sampling}, "
            f"max_new_tokens {st['max_new_tokens']}, {st['dtype']} on {m['device']} ({m['gpu'] or m['cpu']}, "
            f"{m['torch_threads']} torch threads, load {m['load_average_1_5_15']}), {st['runs']} run(s)"
            f"{' (mean ± std over runs)' if st['runs'] > 1 else ''}, torch {m['torch']}, transformers "
            f"{m['transformers']}, {m['date']}.")


def write_report(full: dict[str, Any], out_dir: Path) -> None:
    """``summary.json``, ``summary.md``, ``summary.png`` (and the overall table on stdout)."""
    text = report.markdown(full, heading(full), full["method_descriptions"])
    print_table("Spec-Bench, overall", report.OVERALL_HEADER, report.overall_rows(full), left=1)
    header, rows = report.metric_table(full, "speedup", ".3f")
    print_table("Speedup over the vanilla loop, per subtask", header, rows, left=1)
    cut = full["results"]["overall"]["vanilla"]["prompts_cut"]
    if cut:
        print(f"note: {cut} prompt(s) were cut from the left to fit the context of {full['context_length']} tokens "
              "minus max_new_tokens", file=sys.stderr)
    write_outputs(out_dir, "summary", full, text,
                  plot=lambda rep, path: report.plot(rep, path, title=f"Spec-Bench: {rep['model_name']}"))
