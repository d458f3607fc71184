"""A seeded, resumable, distributed batch sampler that groups examples of similar length.

Each epoch: a random permutation seeded by ``seed + epoch`` is cut into mega-batches of
``batch_size * mega_batch_mult`` examples, each sorted by length (longest first), and then cut into
batches; finally the order of the batches is shuffled. Batches hold similar lengths (little
padding) yet their order is random, and a mega-batch is large enough that the long ones do not all
come at once (the HF Trainer's ``group_by_length`` does the same).

The batch sequence of a rank is a pure function of ``(seed, epoch, lengths, batch_size,
num_replicas, rank)`` (plus the flags), so a run resumed mid-epoch sees exactly the batches it
would have seen: ``set_start_batch(k)`` (or ``load_state_dict``) skips the first ``k`` batches of
the current epoch, once.

Multi-process training: every rank gets a disjoint share of equal count (batches are padded by
repetition, or trimmed with ``drop_last``). With Lightning set ``Trainer(use_distributed_sampler=False)``
so that it does not try to inject its own ``DistributedSampler``: this sampler shards itself.

The epoch comes from ``set_epoch`` or, when given, from ``epoch_fn`` read as each iteration starts
(the data module passes the trainer's current epoch, so nothing has to call ``set_epoch``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices, grouped by length, shuffled per epoch, resumable.

    Args:
        lengths: token count of every dataset item (length N).
        batch_size: items per batch (per rank).
        shuffle: permute items and batch order each epoch; False keeps the input order, sorted by
            length within mega-batches when ``group_by_length`` (use a large ``mega_batch_mult`` for
            one global sort, as evaluation does).
        seed: base seed; epoch ``e`` uses ``seed + e``.
        drop_last: drop the last incomplete batch (and trim the batch count to a multiple of
            ``num_replicas`` instead of padding it).
        num_replicas: number of ranks sharing the data.
        rank: this rank, in ``[0, num_replicas)``.
        mega_batch_mult: mega-batch size in batches.
        group_by_length: sort within mega-batches; False gives plain seeded random batching with the
            same resume and sharding semantics.
        epoch_fn: if given, called as each iteration starts to select the epoch (overrides ``set_epoch``).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        mega_batch_mult: int = 50,
        group_by_length: bool = True,
        epoch_fn: Callable[[], int] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        if mega_batch_mult < 1:
            raise ValueError(f"mega_batch_mult must be >= 1, got {mega_batch_mult}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.mega_batch_mult = mega_batch_mult
        self.group_by_length = group_by_length
        self.epoch = 0
        # (epoch, k): the next iteration of ``epoch`` skips its first k batches.
        self._pending_start: tuple[int, int] | None = None
        self._batches_yielded = 0
        self.epoch_fn = epoch_fn

    # ----------------------------------------------------------------------------------------------
    # The pure part

    def _global_batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        if n == 0:
            return []
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=generator)
        else:
            generator = None
            order = torch.arange(n)
        if self.group_by_length:
            mega = self.batch_size * self.mega_batch_mult
            pieces = []
            for chunk in order.split(mega):
                # stable sort, longest first: ties keep the permutation's (seeded) order
                _, idx = torch.sort(self.lengths[chunk], descending=True, stable=True)
                pieces.append(chunk[idx])
            order = torch.cat(pieces)
        batches = [b.tolist() for b in order.split(self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle and len(batches) > 1:
            batch_order = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in batch_order]
        return batches

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """This rank's full batch list of ``epoch`` (no resume offset applied).

        A pure function of the constructor arguments and ``epoch``.
        """
        batches = self._global_batches(epoch)
        r = self.num_replicas
        if r > 1 and batches:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % r]
            elif len(batches) % r:
                # pad by repeating batches from the start so every rank runs the same step count
                missing = r - len(batches) % r
                batches = batches + [batches[i % len(batches)] for i in range(missing)]
        return batches[self.rank :: r]

    # ----------------------------------------------------------------------------------------------
    # Epochs and resume

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields (Lightning calls this each epoch)."""
        self.epoch = int(epoch)

    def set_start_batch(self, k: int, epoch: int | None = None) -> None:
        """Skip the first ``k`` batches of the next iteration of ``epoch`` (default: the current one).

        Applies once: later epochs (and a second pass over the same epoch) start at batch 0. A start
        set for a later epoch waits until ``set_epoch`` selects it; one for an earlier epoch is dropped.
        """
        if k < 0:
            raise ValueError(f"start batch must be >= 0, got {k}")
        self._pending_start = (self.epoch if epoch is None else int(epoch), int(k))

    @property
    def pending_start(self) -> tuple[int, int] | None:
        """``(epoch, k)`` set by ``set_start_batch`` and not yet used by an iteration, else None."""
        return self._pending_start

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches_yielded", "seed"}`` of the current iteration.

        ``batches_yielded`` counts batches handed to the DataLoader, which runs ahead of training by
        its prefetch when ``num_workers > 0``; a training loop that knows how many batches it
        actually consumed should call ``set_start_batch`` with that number instead.
        """
        return {"epoch": self.epoch, "batches_yielded": self._batches_yielded, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: select ``state["epoch"]`` and skip its first ``state["batches_yielded"]`` batches."""
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has {self.seed}")
        self.set_epoch(state["epoch"])
        self.set_start_batch(int(state["batches_yielded"]))

    def _take_start(self) -> int:
        pending = self._pending_start
        if pending is None or pending[0] > self.epoch:
            return 0
        self._pending_start = None
        return pending[1] if pending[0] == self.epoch else 0

    def __iter__(self) -> Iterator[list[int]]:
        if self.epoch_fn is not None:
            self.set_epoch(self.epoch_fn())
        batches = self.batches_for_epoch(self.epoch)
        start = self._take_start()
        self._batches_yielded = start
        for batch in batches[start:]:
            self._batches_yielded += 1
            yield batch

    def __len__(self) -> int:
        """Batches of a full epoch on this rank (a resumed epoch yields ``len(self) - k`` of them).

        The full count is what the trainer's progress, already at ``k`` after a restore, counts up to.
        """
        n, b, r = len(self.lengths), self.batch_size, self.num_replicas
        total = n // b if self.drop_last else -(-n // b)
        if r == 1:
            return total
        return total // r if self.drop_last else -(-total // r)
