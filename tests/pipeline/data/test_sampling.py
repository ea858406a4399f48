"""Deterministic, resumable, disjoint batches."""

from __future__ import annotations

import pytest

from pipeline.data.sampling import ShardBatchSampler


def batches(**kwargs: int) -> list[list[int]]:
    options = dict(shard_sizes=[5, 7, 4], batch_size=3, seed=1, end_iteration=20)
    options.update(kwargs)
    return list(ShardBatchSampler(**options))


def test_deterministic_and_resumable() -> None:
    full = batches()
    assert full == batches() and len(full) == 20
    assert batches(start_iteration=7) == full[7:]  # resuming at any iteration gives the same batches
    assert batches(seed=2) != full


def test_each_epoch_is_a_permutation_read_shard_by_shard() -> None:
    sampler = ShardBatchSampler([5, 7, 4], 4, end_iteration=8)
    order = sampler.epoch_order(0)
    assert sorted(order) == list(range(16))
    shards = [0 if i < 5 else 1 if i < 12 else 2 for i in order]
    assert shards == sorted(shards, key=shards.index)  # contiguous runs: one shard at a time
    assert sampler.epoch_order(1) != order


def test_workers_get_disjoint_samples() -> None:
    ranks = [ShardBatchSampler([5, 7, 4], 2, rank=r, world_size=2, end_iteration=4) for r in range(2)]
    seen = [sum(list(sampler), []) for sampler in ranks]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == 8


def test_too_few_samples() -> None:
    with pytest.raises(ValueError, match="16 samples are too few for batch size 9 on 2 worker"):
        ShardBatchSampler([5, 7, 4], 9, world_size=2, end_iteration=1)
