"""Input validation and timing shared by the speculative and the vanilla decoder."""

from __future__ import annotations

import torch

from kangaroo_lit.model import KangarooModel


def check_inputs(model: KangarooModel, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Validate a generation request.

    Args:
        model: the model; it must be in eval mode (LoRA dropout would change the output).
        input_ids: (1, T) prompt ids, T >= 1.
        max_new_tokens: most tokens to generate, >= 1.

    Returns:
        The prompt on the model's device.

    Raises:
        ValueError: on a batch > 1, an empty prompt, a budget < 1, a model in training mode, or a prompt
            whose length + ``max_new_tokens`` exceeds ``config.max_position_embeddings``.
    """
    if model.training:
        raise ValueError("the model is in training mode (dropout would change the output): call model.eval()")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"only batch size 1 is supported, got a batch of {input_ids.shape[0]}")
    if input_ids.shape[1] < 1:
        raise ValueError("the prompt must hold at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = getattr(model.config, "max_position_embeddings", None)
    length = input_ids.shape[1]
    if limit is not None and length + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {length} + max_new_tokens {max_new_tokens} = {length + max_new_tokens} exceeds "
            f"the model's max_position_embeddings {limit}"
        )
    return input_ids.to(model.causal_lm.model.embed_tokens.weight.device)


def eos_set(eos_token_id: int | list[int] | None) -> set[int]:
    """The stop tokens as a set (empty: never stop early)."""
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall times include it (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
