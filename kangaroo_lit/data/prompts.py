"""Prompt templates for Dolly-format rows.

One template is used everywhere (training, evaluation, ``generate``, the embedded tiny model's own
training data), so a model fine-tuned here sees at decode time exactly the prompts it was trained on.
"""

from __future__ import annotations

PROMPT_NO_CONTEXT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_CONTEXT = "### Instruction:\n{instruction}\n\n### Context:\n{context}\n\n### Response:\n"


def format_prompt(instruction: str, context: str = "") -> str:
    """Render the prompt part of a row; the response follows it directly.

    Args:
        instruction: the task.
        context: optional supporting text; empty or whitespace-only means "no context".
    """
    if context and context.strip():
        return PROMPT_WITH_CONTEXT.format(instruction=instruction.strip(), context=context.strip())
    return PROMPT_NO_CONTEXT.format(instruction=instruction.strip())
