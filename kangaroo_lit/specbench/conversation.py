"""A question's conversation as the model's prompt: a chat template, or a named one, then the context limit.

Turn ``i`` of a question is rendered after the user's earlier turns and the method's *own* earlier
answers (Spec-Bench's ``eval.py`` does the same: each method continues its own conversation). Templates:

* ``chat``: the tokenizer's chat template (``apply_chat_template`` with the generation prompt);
* ``vicuna``: FastChat's ``vicuna_v1.1``, the template Spec-Bench's Vicuna numbers were measured with:
  ``"<system> USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"``;
* ``instruction``: this project's training template (``### Instruction: ... ### Response:``), what
  the embedded tiny model was trained on;
* ``auto``: ``chat`` when the tokenizer has a chat template, else ``vicuna``.

A prompt longer than the model's context minus ``max_new_tokens`` is cut from the left (a leading BOS
is kept) and the cut is counted (DESIGN §4): the end of a prompt, the question being asked, matters most.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from kangaroo_lit.data.prompts import format_prompt
from kangaroo_lit.data.tokenize import has_chat_template
from kangaroo_lit.errors import ConfigError

Template = Literal["auto", "chat", "vicuna", "instruction"]
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass
class EncodedPrompt:
    """A rendered, tokenized prompt.

    Attributes:
        ids: (1, T) token ids, T <= the context minus ``max_new_tokens``.
        tokens: T, after any cut.
        cut: tokens removed from the left (0 when it fitted).
    """

    ids: torch.Tensor
    tokens: int
    cut: int


def resolve_template(template: Template, tokenizer) -> str:
    """``auto`` made concrete; ``chat`` for a tokenizer without a chat template is an error.

    Raises:
        ConfigError: ``chat`` asked of a tokenizer that has none, or an unknown name.
    """
    if template == "auto":
        return "chat" if has_chat_template(tokenizer) else "vicuna"
    if template == "chat" and not has_chat_template(tokenizer):
        raise ConfigError("--format chat: this model's tokenizer has no chat template; use --format vicuna "
                          "(Spec-Bench's Vicuna template) or instruction (this project's training template)")
    if template not in ("chat", "vicuna", "instruction"):
        raise ConfigError(f"--format must be auto, chat, vicuna or instruction, got {template!r}")
    return template


class PromptRenderer:
    """Renders and tokenizes a question's conversation up to one of its turns.

    Args:
        tokenizer: the model's tokenizer.
        template: see the module docstring.
        context_length: the model's ``max_position_embeddings`` (None: no limit known).
        max_new_tokens: tokens reserved for the answer.

    Raises:
        ConfigError: ``max_new_tokens`` leaves less than two tokens of the context for the prompt.
    """

    def __init__(self, tokenizer, template: Template, context_length: int | None, max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.template = resolve_template(template, tokenizer)
        self.max_prompt_tokens = None if context_length is None else context_length - max_new_tokens
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 2:
            raise ConfigError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                              f"of {context_length} tokens (max_position_embeddings); use --max_new_tokens "
                              f"{context_length // 2} or less")

    def render(self, turns: Sequence[str], answers: Sequence[str]) -> str:
        """The prompt text for the last of ``turns``, after ``answers`` to the ones before it."""
        if len(answers) != len(turns) - 1:
            raise ValueError(f"{len(turns)} turns need {len(turns) - 1} earlier answers, got {len(answers)}")
        if self.template == "chat":
            messages = []
            for i, turn in enumerate(turns):
                messages.append({"role": "user", "content": turn})
                if i < len(answers):
                    messages.append({"role": "assistant", "content": answers[i]})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.template == "vicuna":
            end = self.tokenizer.eos_token or "</s>"
            text = VICUNA_SYSTEM + " "
            for i, turn in enumerate(turns):
                text += f"USER: {turn} ASSISTANT:"
                if i < len(answers):
                    text += f" {answers[i]}{end}"
            return text
        parts = [format_prompt(turn) + (answers[i] if i < len(answers) else "") for i, turn in enumerate(turns)]
        return "\n\n".join(parts)

    def encode(self, turns: Sequence[str], answers: Sequence[str]) -> EncodedPrompt:
        """:meth:`render`, tokenized and cut from the left to fit the context."""
        text = self.render(turns, answers)
        # A chat template writes its own special tokens (BOS included); the plain templates get the
        # tokenizer's, as Spec-Bench's ``tokenizer([prompt])`` does.
        ids = self.tokenizer(text, add_special_tokens=self.template != "chat").input_ids
        ids, cut = cut_left(ids, self.max_prompt_tokens, self.tokenizer.bos_token_id)
        return EncodedPrompt(ids=torch.tensor([ids], dtype=torch.long), tokens=len(ids), cut=cut)


def cut_left(ids: Sequence[int], limit: int | None, bos_id: int | None) -> tuple[list[int], int]:
    """``ids`` cut from the left to at most ``limit`` tokens, a leading BOS kept; ``(ids, tokens cut)``."""
    ids = list(ids)
    if limit is None or len(ids) <= limit:
        return ids, 0
    cut = len(ids) - limit
    if bos_id is not None and ids and ids[0] == bos_id and limit >= 2:
        return [ids[0]] + ids[cut + 1:], cut
    return ids[cut:], cut
