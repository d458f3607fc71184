"""Compact storage of tokenized examples and the map-style ``Dataset`` views over it.

All examples live in one flat int32 tensor with offsets (a few MB for Dolly 15k instead of 15k
small Python lists), which is also what the cache writes to disk and what dataloader workers copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from kangaroo_lit.data.tokenize import IGNORE_INDEX, Encoded


@dataclass
class TokenizedRows:
    """Every tokenized example of a dataset, flat.

    Attributes:
        input_ids: (total_tokens,) int32, the examples concatenated.
        offsets: (N + 1,) int64; example ``i`` is ``input_ids[offsets[i]:offsets[i + 1]]``.
        prompt_lens: (N,) int32, leading non-target positions of each example.
        row_ids: (N,) int64, the source row of each example (text chunks of one document share it;
            splits are made by row so that no document straddles train and validation).
    """

    input_ids: torch.Tensor
    offsets: torch.Tensor
    prompt_lens: torch.Tensor
    row_ids: torch.Tensor

    @classmethod
    def from_encoded(cls, examples: Sequence[Encoded]) -> TokenizedRows:
        lengths = torch.tensor([len(e.ids) for e in examples], dtype=torch.int64)
        offsets = torch.zeros(len(examples) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        flat = [t for e in examples for t in e.ids]
        return cls(
            input_ids=torch.tensor(flat, dtype=torch.int32),
            offsets=offsets,
            prompt_lens=torch.tensor([e.n_prompt for e in examples], dtype=torch.int32),
            row_ids=torch.tensor([e.row for e in examples], dtype=torch.int64),
        )

    def __len__(self) -> int:
        return len(self.prompt_lens)

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) int64 token count of each example."""
        return self.offsets[1:] - self.offsets[:-1]

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Example ``i`` as ``(input_ids, labels)``, both (T,) int64; labels are -100 on the prompt."""
        ids = self.input_ids[self.offsets[i] : self.offsets[i + 1]].long()
        labels = ids.clone()
        labels[: int(self.prompt_lens[i])] = IGNORE_INDEX
        return ids, labels

    def to_state(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "offsets": self.offsets,
            "prompt_lens": self.prompt_lens,
            "row_ids": self.row_ids,
        }

    @classmethod
    def from_state(cls, state: dict) -> TokenizedRows:
        rows = cls(**{k: state[k] for k in ("input_ids", "offsets", "prompt_lens", "row_ids")})
        n = len(rows.prompt_lens)
        if rows.offsets.shape != (n + 1,) or rows.row_ids.shape != (n,) or int(rows.offsets[-1]) != len(rows.input_ids):
            raise ValueError("inconsistent tokenized data")
        return rows


class TokenDataset(Dataset):
    """A split: a subset of ``TokenizedRows`` by example index.

    Args:
        rows: the tokenized data.
        indices: example indices of this split.

    Items are dicts ``{"input_ids": (T,) int64, "labels": (T,) int64}``.
    """

    def __init__(self, rows: TokenizedRows, indices: Sequence[int] | torch.Tensor):
        self.rows = rows
        self.indices = torch.as_tensor(indices, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.rows.example(int(self.indices[i]))
        return {"input_ids": ids, "labels": labels}

    @property
    def lengths(self) -> list[int]:
        """Token count of each item, in item order (what the length-grouped sampler sorts by)."""
        return self.rows.lengths[self.indices].tolist()

    @property
    def row_ids(self) -> list[int]:
        """Source row of each item."""
        return self.rows.row_ids[self.indices].tolist()

    @property
    def num_target_tokens(self) -> int:
        """Number of target (non -100) positions over the whole split."""
        lengths = self.rows.lengths[self.indices]
        return int((lengths - self.rows.prompt_lens[self.indices].long()).sum())
