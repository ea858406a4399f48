"""Deterministic, resumable batches over shards, split across workers.

Iteration ``i`` of a run always gets the same batch, whatever happened before: the epoch is
``i // batches_per_epoch``, and within an epoch the order is a seeded shuffle of the shards, each shard's rows
shuffled in turn (so a worker reads one shard at a time instead of jumping between them), dealt round-robin
to the workers. Resuming at iteration ``i`` is therefore exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class ShardBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices for one worker, from ``start_iteration`` to ``end_iteration``.

    Args:
        shard_sizes: rows of each shard, in dataset order (indices are consecutive per shard).
        batch_size: samples per batch per worker.
        rank: this worker; world_size: all workers.
        seed: base seed of the shuffles.
        start_iteration, end_iteration: the global iterations to produce.
    """

    def __init__(
        self,
        shard_sizes: Sequence[int],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_iteration: int = 0,
        end_iteration: int,
    ) -> None:
        self.shard_sizes = list(shard_sizes)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_iteration = start_iteration
        self.end_iteration = end_iteration
        per_worker = sum(self.shard_sizes) // world_size
        self.batches_per_epoch = per_worker // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{sum(self.shard_sizes)} samples are too few for batch size {batch_size} "
                f"on {world_size} worker(s)"
            )

    def epoch_order(self, epoch: int) -> list[int]:
        """This worker's indices for ``epoch``, shard by shard."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        offsets = [sum(self.shard_sizes[:i]) for i in range(len(self.shard_sizes))]
        order: list[int] = []
        for shard in torch.randperm(len(self.shard_sizes), generator=generator).tolist():
            rows = torch.randperm(self.shard_sizes[shard], generator=generator)
            order += (rows + offsets[shard]).tolist()
        return order[self.rank :: self.world_size]

    def epoch_of(self, iteration: int) -> int:
        return iteration // self.batches_per_epoch

    def __len__(self) -> int:
        return max(self.end_iteration - self.start_iteration, 0)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = -1, []
        for iteration in range(self.start_iteration, self.end_iteration):
            if self.epoch_of(iteration) != epoch:
                epoch = self.epoch_of(iteration)
                order = self.epoch_order(epoch)
            start = (iteration % self.batches_per_epoch) * self.batch_size
            yield order[start : start + self.batch_size]
