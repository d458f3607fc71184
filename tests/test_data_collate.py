"""Collation: right padding, attention mask, labels masked on padding by the mask (pad id == EOS)."""

import torch

from kangaroo_lit.data.collate import Collator, padding_fraction, resolve_pad_id
from kangaroo_lit.data.tokenize import IGNORE_INDEX

EOS = 2


def item(ids, n_prompt):
    ids = torch.tensor(ids)
    labels = ids.clone()
    labels[:n_prompt] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def test_right_padding_mask_and_labels_with_pad_equal_to_eos():
    batch = Collator(pad_id=EOS)([item([1, 10, 11, 20, EOS], 3), item([1, 12, 21, EOS], 2), item([1, 30, EOS], 1)])
    assert batch["input_ids"].tolist() == [[1, 10, 11, 20, EOS], [1, 12, 21, EOS, EOS], [1, 30, EOS, EOS, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    m = IGNORE_INDEX
    # the real final EOS is a target in every row; the EOS-valued padding is not
    assert batch["labels"].tolist() == [[m, m, m, 20, EOS], [m, m, 21, EOS, m], [m, 30, EOS, m, m]]
    assert all(t.dtype == torch.int64 and t.shape == (3, 5) for t in batch.values())
    assert abs(padding_fraction(batch) - 3 / 15) < 1e-9


def test_pad_to_multiple_of():
    batch = Collator(pad_id=0, pad_to_multiple_of=8)([item([1, 5, 6], 1), item(list(range(1, 10)), 1)])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [3, 9]
    assert (batch["labels"][:, 9:] == IGNORE_INDEX).all()


def test_pad_id_fallbacks(tiny_tokenizer):
    class Tok:
        pad_token_id = None
        eos_token_id = None
        unk_token_id = 7

    assert resolve_pad_id(tiny_tokenizer) == tiny_tokenizer.eos_token_id  # no pad token: EOS
    assert resolve_pad_id(Tok()) == 7
    Tok.unk_token_id = None
    assert resolve_pad_id(Tok()) == 0
    Tok.pad_token_id = 3
    assert resolve_pad_id(Tok()) == 3
