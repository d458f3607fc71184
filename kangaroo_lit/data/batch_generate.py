"""Batched generation for data making (``distill``, ``self_instruct``): finished rows leave the batch.

HF ``generate`` keeps every row of a batch until the longest one ends, so a batch whose answers run
20 to 256 tokens pays 256 steps for all of them. Here a row that has produced EOS (or its budget) is
dropped from the batch, its KV cache rows included (``DynamicCache.batch_select_indices``), and the
remaining rows go on. Each row's tokens are exactly what it would get alone in float64 (left padding is
masked and positions follow each row's own tokens, as HF ``generate`` sets them); sampling follows HF's
order (temperature, then top-p; no top-k) from one generator per call.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """(B,) next ids from (B, V) logits: argmax at temperature 0, else temperature + nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        # HF's TopPLogitsWarper: drop the tokens whose cumulative probability (ascending) is <= 1 - top_p.
        sorted_logits, order = logits.sort(dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - top_p
        remove[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                   stop_ids: set[int], temperature: float = 0.0, top_p: float = 1.0,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """Generate after each left-padded prompt, dropping rows from the batch as they finish.

    Args:
        model: a Hugging Face causal LM (eval mode).
        input_ids: (B, T) left-padded prompt ids.
        attention_mask: (B, T), 0 on the padding.
        max_new_tokens: most tokens generated per row (>= 1).
        stop_ids: token ids that end a row (included in its output).
        temperature: 0 = greedy, else sampled at this temperature.
        top_p: nucleus mass when sampling.
        generator: random generator for sampling.

    Returns:
        Per row, the generated ids (up to and including a stop id, or ``max_new_tokens`` of them).
    """
    batch = input_ids.shape[0]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    alive = list(range(batch))  # original row index of each row still in the batch
    mask = attention_mask.clone()
    positions = (mask.cumsum(dim=-1) - 1).clamp_min(0)
    cache = DynamicCache()
    # logits_to_keep=1: the head on the last position only (a (B, T, V) prefill would take gigabytes).
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    next_position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        tokens = _next_tokens(logits, temperature, top_p, generator)
        keep = []
        for i, tok in enumerate(tokens.tolist()):
            outputs[alive[i]].append(tok)
            if tok not in stop_ids and step + 1 < max_new_tokens:
                keep.append(i)
        if not keep:
            break
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(index)
            tokens, mask, next_position = tokens[index], mask[index], next_position[index]
            alive = [alive[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position,
                       past_key_values=cache, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    return outputs
