"""The length-grouped batch sampler: determinism, coverage, padding, exact resume, sharding."""

import random

import pytest

from kangaroo_lit.data.sampler import LengthGroupedBatchSampler


def varied_lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.randint(4, 400) for _ in range(n)]


def padding_of(batches, lengths):
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def test_deterministic_and_pure():
    lengths = varied_lengths()
    a = LengthGroupedBatchSampler(lengths, 8, seed=3)
    b = LengthGroupedBatchSampler(lengths, 8, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) == a.batches_for_epoch(2)
    assert list(a) == list(a)  # re-iterating the same epoch repeats it


def test_every_index_once_per_epoch_and_orders_differ():
    lengths = varied_lengths(1003)
    sampler = LengthGroupedBatchSampler(lengths, 8, seed=0)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 126
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(1003))
        assert sum(len(b) < 8 for b in batches) == 1
        epochs.append(flat)
    assert epochs[0] != epochs[1] != epochs[2]
    other_seed = LengthGroupedBatchSampler(lengths, 8, seed=1)
    assert [i for b in other_seed for i in b] != epochs[0]


def test_low_padding_versus_random_batches():
    lengths = varied_lengths()
    grouped = list(LengthGroupedBatchSampler(lengths, 8, seed=0))
    plain = list(LengthGroupedBatchSampler(lengths, 8, seed=0, group_by_length=False))
    assert sorted(i for b in plain for i in b) == list(range(len(lengths)))
    assert padding_of(grouped, lengths) < 0.1 < 0.4 < padding_of(plain, lengths)
    # the batch order is still random: lengths of consecutive batches are not monotone
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_drop_last():
    sampler = LengthGroupedBatchSampler(varied_lengths(1003), 8, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 125 and all(len(b) == 8 for b in batches)


@pytest.mark.parametrize("k", [0, 1, 37, 126, 200])
def test_resume_at_batch_k_yields_exactly_the_remaining_batches(k):
    lengths = varied_lengths(1003)
    reference = LengthGroupedBatchSampler(lengths, 8, seed=5)
    reference.set_epoch(1)
    full = list(reference)

    resumed = LengthGroupedBatchSampler(lengths, 8, seed=5)  # a fresh process
    resumed.set_epoch(1)
    resumed.set_start_batch(k)
    assert list(resumed) == full[k:]
    assert list(resumed) == full  # only once: a second pass starts at 0
    resumed.set_epoch(2)
    assert list(resumed) == resumed.batches_for_epoch(2)


def test_start_batch_set_before_set_epoch_waits_for_its_epoch():
    lengths = varied_lengths(200)
    sampler = LengthGroupedBatchSampler(lengths, 4, seed=0)
    sampler.set_start_batch(10, epoch=3)  # e.g. restored before the trainer selects the epoch
    sampler.set_epoch(3)
    assert list(sampler) == sampler.batches_for_epoch(3)[10:]
    sampler.set_start_batch(5, epoch=1)  # stale: an earlier epoch is dropped
    sampler.set_epoch(4)
    assert list(sampler) == sampler.batches_for_epoch(4)


def test_state_dict_round_trip():
    lengths = varied_lengths(300)
    sampler = LengthGroupedBatchSampler(lengths, 4, seed=9)
    sampler.set_epoch(2)
    it = iter(sampler)
    seen = [next(it) for _ in range(7)]
    state = sampler.state_dict()
    assert state == {"epoch": 2, "batches_yielded": 7, "seed": 9}
    restored = LengthGroupedBatchSampler(lengths, 4, seed=9)
    restored.load_state_dict(state)
    assert seen + list(restored) == sampler.batches_for_epoch(2)
    with pytest.raises(ValueError, match="seed"):
        LengthGroupedBatchSampler(lengths, 4, seed=1).load_state_dict(state)


@pytest.mark.parametrize("n, replicas, drop_last", [(1003, 2, False), (1003, 3, False), (1003, 4, True), (5, 4, False)])
def test_distributed_shares_are_disjoint_and_equal(n, replicas, drop_last):
    lengths = varied_lengths(n)
    shares = []
    for rank in range(replicas):
        s = LengthGroupedBatchSampler(lengths, 8, seed=1, num_replicas=replicas, rank=rank, drop_last=drop_last)
        s.set_epoch(4)
        shares.append(list(s))
        assert len(shares[-1]) == len(s)
    assert len({len(share) for share in shares}) == 1
    single = LengthGroupedBatchSampler(lengths, 8, seed=1, drop_last=drop_last).batches_for_epoch(4)
    flat = [tuple(b) for share in shares for b in share]
    if not drop_last and len(single) % replicas:
        # padding repeats whole batches from the start; nothing else is duplicated
        assert sorted(set(flat)) == sorted(tuple(b) for b in single)
    else:
        assert len(flat) == len(set(flat))  # disjoint
        assert set(flat) <= {tuple(b) for b in single}


def test_unshuffled_sorted_order_and_validation():
    lengths = [5, 9, 1, 7, 3]
    sampler = LengthGroupedBatchSampler(lengths, 2, shuffle=False, mega_batch_mult=10)
    assert list(sampler) == [[1, 3], [0, 4], [2]]
    assert list(LengthGroupedBatchSampler([], 2)) == [] and len(LengthGroupedBatchSampler([], 2)) == 0
    with pytest.raises(ValueError):
        LengthGroupedBatchSampler(lengths, 0)
    with pytest.raises(ValueError):
        LengthGroupedBatchSampler(lengths, 2, num_replicas=2, rank=2)


def test_epoch_comes_from_epoch_fn_at_each_iteration():
    """The data module passes the trainer's epoch: each iteration reads it, no set_epoch needed."""
    current = {"epoch": 3}
    sampler = LengthGroupedBatchSampler(varied_lengths(50), 4, epoch_fn=lambda: current["epoch"])
    reference = LengthGroupedBatchSampler(varied_lengths(50), 4)
    assert list(sampler) == reference.batches_for_epoch(3) and sampler.epoch == 3
    current["epoch"] = 4
    assert list(sampler) == reference.batches_for_epoch(4) != reference.batches_for_epoch(3)
