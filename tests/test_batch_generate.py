"""Batched generation that drops finished rows: each row equals HF ``generate`` on that prompt alone
(float64, left padding masked, positions per row), rows end at EOS or their budget."""

import pytest
import torch

from kangaroo_lit.architectures import load_base_model
from kangaroo_lit.data.batch_generate import _next_tokens, generate_batch
from tests.conftest import ARCHITECTURES

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 17, 42, 99, 7], [9, 8], [4, 60, 61, 62, 63, 64, 65, 66, 67], [30]]


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_row_equals_generate_alone(arch, tiny_model_dirs):
    model = load_base_model(str(tiny_model_dirs[arch]), "float64")
    ids, mask = left_padded(PROMPTS)
    alone = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, -12:].tolist() for p in PROMPTS]
    # A stop id that some rows produce early makes rows end at different steps, so the batch shrinks
    # while the others go on.
    stop = max({t for row in alone for t in row[1:6]}, key=lambda t: sum(t in row[:8] for row in alone))
    rows = generate_batch(model, ids, mask, 12, {stop})
    for row, reference in zip(rows, alone):
        expected = reference[: reference.index(stop) + 1] if stop in reference else reference
        assert row == expected
    assert len({len(r) for r in rows}) > 1  # rows really left the batch at different steps


def test_sampling_respects_top_p_and_temperature():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    probs = torch.tensor([4.0, 3.0, 0.0, -1.0]).softmax(-1)
    assert probs[0] < 0.9 < probs[0] + probs[1]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([_next_tokens(logits, 1.0, 0.9, g) for _ in range(400)]).flatten().tolist()
    assert set(draws) == {0, 1}  # the nucleus of mass 0.9 holds exactly the two most likely tokens
    assert _next_tokens(logits, 0.0, 1.0, None).tolist() == [0]
