"""Turning rows into token ids and label masks: prompt/response boundary, chat template, truncation.

Every example is stored as its token ids plus ``n_prompt``, the number of leading positions that are
not targets; labels are ``ids`` with those positions set to ``IGNORE_INDEX`` (-100). Labels are not
shifted: the model shifts them.

* ``format="dolly"``: ``ids = tokenizer(prompt + response) + [eos]`` (with the tokenizer's special
  tokens, i.e. BOS); the prompt is masked, the response and the final EOS are targets.
* ``format="text"``: ``ids = tokenizer(text) + [eos]``, every token a target, long documents cut
  into ``max_length`` chunks rather than dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from kangaroo_lit.data.prompts import format_prompt

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Rows are tokenized in batches: the fast tokenizers' batch call is several times faster per row.
_TOKENIZE_BATCH = 256


@dataclass
class Encoded:
    """One tokenized example.

    Attributes:
        ids: token ids, length T <= max_length.
        n_prompt: number of leading positions that are not targets (0 for plain text).
        row: index of the source row (several chunks of a long text document share it).
    """

    ids: list[int]
    n_prompt: int
    row: int


@dataclass
class TruncationStats:
    """Counts reported once per tokenization (and kept in the cache, so cache hits report them too).

    Attributes:
        rows: source rows tokenized.
        examples: examples produced (more than ``rows`` when text documents are chunked).
        prompt_cut: Dolly rows whose prompt lost tokens on the left.
        response_cut: Dolly rows whose response (or final EOS) was cut at the end.
        docs_chunked: text documents longer than ``max_length``, split into several examples.
        boundary_merges: Dolly rows where BPE merged across the prompt/response boundary, so the
            two parts were tokenized separately.
    """

    rows: int = 0
    examples: int = 0
    prompt_cut: int = 0
    response_cut: int = 0
    docs_chunked: int = 0
    boundary_merges: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self, max_length: int) -> str:
        parts = [f"tokenized {self.rows} rows into {self.examples} examples (max_length={max_length})"]
        if self.prompt_cut or self.response_cut:
            parts.append(f"{self.prompt_cut} prompts cut from the left, {self.response_cut} responses cut at the end")
        if self.docs_chunked:
            parts.append(f"{self.docs_chunked} long documents split into chunks")
        if self.boundary_merges:
            parts.append(f"{self.boundary_merges} prompt/response boundaries tokenized separately")
        return "; ".join(parts)


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template (``apply_chat_template`` would work)."""
    return bool(getattr(tokenizer, "chat_template", None))


def truncate_example(
    prompt: Sequence[int], target: Sequence[int], max_length: int, bos_id: int | None
) -> tuple[list[int], list[int], bool, bool]:
    """Fit ``prompt + target`` into ``max_length`` while keeping as much of the target as possible.

    The prompt is cut from the left (its end, which holds the "### Response:" marker, is what the
    response depends on most), keeping a leading BOS, down to a floor of ``max(1, max_length // 4)``
    tokens; then, if still too long, the target is cut at its end. A cut target loses its final EOS:
    teaching the model to stop mid-sentence would be wrong.

    Args:
        prompt: prompt ids (incl. BOS), length P.
        target: response ids followed by EOS, length R.
        max_length: the limit on P + R after truncation.
        bos_id: the BOS id, kept in front when the prompt starts with it.

    Returns:
        ``(prompt, target, prompt_cut, target_cut)``.
    """
    prompt, target = list(prompt), list(target)
    if len(prompt) + len(target) <= max_length:
        return prompt, target, False, False
    floor = min(len(prompt), max(1, max_length // 4))
    keep = max(floor, max_length - len(target))
    prompt_cut = keep < len(prompt)
    if prompt_cut:
        if bos_id is not None and prompt and prompt[0] == bos_id and keep >= 2:
            prompt = [prompt[0]] + prompt[len(prompt) - (keep - 1) :]
        else:
            prompt = prompt[len(prompt) - keep :]
    room = max_length - len(prompt)
    target_cut = len(target) > room
    if target_cut:
        target = target[:room]
    return prompt, target, prompt_cut, target_cut


class RowEncoder:
    """Tokenizes validated rows for one configuration (tokenizer, format, length, template).

    Args:
        tokenizer: a Hugging Face tokenizer with an ``eos_token_id``.
        max_length: the longest example, in tokens (>= 2).
        data_format: ``"dolly"`` or ``"text"``.
        use_chat_template: render Dolly rows with the tokenizer's chat template. Without a chat
            template the plain prompt template is used instead, with a single warning.
    """

    def __init__(self, tokenizer, max_length: int, data_format: str = "dolly", use_chat_template: bool = False):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; an EOS target is needed")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if data_format not in ("dolly", "text"):
            raise ValueError(f"format must be 'dolly' or 'text', got {data_format!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.data_format = data_format
        self.eos_id: int = tokenizer.eos_token_id
        self.bos_id: int | None = tokenizer.bos_token_id
        self.use_chat_template = use_chat_template and data_format == "dolly" and has_chat_template(tokenizer)
        if use_chat_template and data_format == "dolly" and not self.use_chat_template:
            # Handled, not refused: base models usually ship without a template and the plain one works.
            log.warning(
                "use_chat_template=True but tokenizer %s has no chat template; using the plain prompt template",
                getattr(tokenizer, "name_or_path", type(tokenizer).__name__) or type(tokenizer).__name__,
            )

    # ----------------------------------------------------------------------------------------------
    # Dolly rows

    def render(self, row: dict) -> tuple[str, str]:
        """The prompt text and the response text that follows it directly.

        With the chat template, the response text is whatever the template puts after the
        generation prompt (it may include the template's end-of-turn text).
        """
        instruction, context, response = row["instruction"], row.get("context", ""), row["response"]
        if not self.use_chat_template:
            return format_prompt(instruction, context), response
        user = instruction.strip()
        if context and context.strip():
            user += "\n\n" + context.strip()
        messages = [{"role": "user", "content": user}]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False
        )
        # Templates that render the assistant turn as a pure suffix give the exact trained text;
        # any other template falls back to the bare response after the generation prompt.
        return prompt, (full[len(prompt) :] if full.startswith(prompt) else response)

    def _split(self, prompt_ids: list[int], full_ids: list[int], response: str) -> tuple[list[int], list[int], bool]:
        """Split ``full_ids`` at the prompt boundary; returns ``(prompt, response, merged)``."""
        n = len(prompt_ids)
        # The prompt's own tokens are a prefix of the full sequence unless BPE merged the last prompt
        # characters with the first response characters; then both parts are tokenized separately
        # and concatenated, so the prompt tokens are exactly those the model sees at decode time.
        if full_ids[:n] == prompt_ids and len(full_ids) > n:
            return prompt_ids, full_ids[n:], False
        response_ids = self.tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]
        return prompt_ids, list(response_ids), True

    def encode_dolly(self, rows: Sequence[dict], first_row: int, stats: TruncationStats) -> list[Encoded]:
        """Tokenize Dolly rows; ``first_row`` is the index of ``rows[0]`` in the whole dataset."""
        texts = [self.render(row) for row in rows]
        # The chat template renders special tokens (BOS) as text already, exactly like
        # ``apply_chat_template(tokenize=True)``, which tokenizes without adding special tokens.
        special = not self.use_chat_template
        tok = self.tokenizer
        prompts = tok([p for p, _ in texts], add_special_tokens=special, verbose=False)["input_ids"]
        fulls = tok([p + r for p, r in texts], add_special_tokens=special, verbose=False)["input_ids"]
        out = []
        for i, ((_, response), prompt_ids, full_ids) in enumerate(zip(texts, prompts, fulls)):
            prompt_ids, response_ids, merged = self._split(list(prompt_ids), list(full_ids), response)
            stats.boundary_merges += merged
            if self.use_chat_template and self.eos_id in response_ids:
                # The template closed the turn with EOS itself; what follows it (a newline before
                # the next turn) is formatting, not something to generate.
                response_ids = response_ids[: response_ids.index(self.eos_id) + 1]
            elif not response_ids or response_ids[-1] != self.eos_id:
                response_ids.append(self.eos_id)
            prompt_ids, response_ids, p_cut, r_cut = truncate_example(
                prompt_ids, response_ids, self.max_length, self.bos_id
            )
            stats.prompt_cut += p_cut
            stats.response_cut += r_cut
            out.append(Encoded(prompt_ids + response_ids, len(prompt_ids), first_row + i))
        return out

    # ----------------------------------------------------------------------------------------------
    # Plain text

    def encode_text(self, rows: Sequence[dict], first_row: int, stats: TruncationStats) -> list[Encoded]:
        """Tokenize text documents; every token (incl. the final EOS) is a target."""
        docs = self.tokenizer([row["text"] for row in rows], add_special_tokens=True, verbose=False)["input_ids"]
        out = []
        for i, ids in enumerate(docs):
            ids = list(ids)
            if not ids or ids[-1] != self.eos_id:
                ids.append(self.eos_id)
            length = self.max_length
            for start in range(0, len(ids), length):
                if start == 0 or len(ids) - start >= length:
                    out.append(Encoded(ids[start : start + length], 0, first_row + i))
                else:
                    # A short tail would be a few tokens without context (a story of max_length + 2
                    # tokens would leave a 2-token chunk predicting EOS from nothing). Take the last
                    # max_length tokens instead; the overlap is context only, not targets again.
                    out.append(Encoded(ids[-length:], length - (len(ids) - start), first_row + i))
            stats.docs_chunked += len(ids) > length
        return out

    # ----------------------------------------------------------------------------------------------

    def encode_rows(self, rows: Sequence[dict]) -> tuple[list[Encoded], TruncationStats]:
        """Tokenize all rows (in batches) and log a truncation summary.

        Returns:
            ``(examples, stats)``; examples keep the row order.
        """
        stats = TruncationStats(rows=len(rows))
        encode = self.encode_dolly if self.data_format == "dolly" else self.encode_text
        examples: list[Encoded] = []
        for start in range(0, len(rows), _TOKENIZE_BATCH):
            examples.extend(encode(rows[start : start + _TOKENIZE_BATCH], start, stats))
        stats.examples = len(examples)
        log.info(stats.summary(self.max_length))
        return examples, stats

    def describe(self) -> dict:
        """What, besides the tokenizer and the data, determines the output (for the cache key)."""
        from kangaroo_lit.data import prompts

        return {
            "format": self.data_format,
            "max_length": self.max_length,
            "use_chat_template": self.use_chat_template,
            "templates": [prompts.PROMPT_NO_CONTEXT, prompts.PROMPT_WITH_CONTEXT],
            "text_chunking": "tail-window-v2",
        }
