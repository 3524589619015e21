"""Batches with a fixed number of labeled and unlabeled samples, for semi-supervised training."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from ..distributed import get_rank, get_world_size


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def _stream(indices: np.ndarray, seed: int, stream: int, start: int) -> Iterator[int]:
    """Position ``start`` onward of an endless stream: pass ``k`` is a fresh permutation of ``indices``.

    Pass ``k`` is seeded with ``(seed, stream, k)``, so any position can be reached without
    replaying earlier passes: resuming at an epoch gives the same batches as running through.
    """
    n = len(indices)
    cycle, offset = divmod(start, n)
    while True:
        order = np.random.Generator(np.random.PCG64([seed, stream, cycle])).permutation(n)
        yield from indices[order[offset:]].tolist()
        cycle, offset = cycle + 1, 0


class TwoStreamBatchSampler(Sampler[list[int]]):
    """Yields index lists: ``labeled_batch_size`` labeled indices, then ``unlabeled_batch_size`` unlabeled.

    Use it as ``DataLoader(dataset, batch_sampler=...)`` where both index sets point into
    ``dataset``, typically ``ConcatDataset([labeled, unlabeled])`` with
    ``labeled_indices=range(len(labeled))`` and
    ``unlabeled_indices=range(len(labeled), len(labeled) + len(unlabeled))``
    (:meth:`for_concat` builds exactly that). In each batch the first ``labeled_batch_size``
    samples are the labeled ones.

    Epoch length: ``num_batches`` when given; otherwise ``len(labeled_indices) // labeled_batch_size``
    (about one pass over the labeled data).

    Each stream is endless and independent of the other: a sequence of passes, each pass a
    fresh permutation of that stream's indices, continued across epochs (epoch ``e`` takes
    stream positions ``e * num_batches * batch_size`` onward). So every unlabeled index is seen
    once per pass over the unlabeled data however short the labeled epochs are, no labeled
    remainder is dropped for good. A batch may straddle two passes and then may hold an index
    twice (once from the end of one pass, once from the start of the next).

    Randomness: pass ``k`` of a stream uses NumPy ``Generator(PCG64((seed, stream, k)))``,
    so batches depend only on the seed and the epoch number. The epoch counter advances at
    each ``iter()``; call :meth:`set_epoch` to pin it (e.g. when resuming).

    Multi-process training (``rank``, ``world_size``; by default those of the running
    ``torch.distributed`` process group, or 0 and 1): the batch sizes are per rank. Every
    rank draws the same *global* batch of ``world_size · labeled_batch_size`` labeled and
    ``world_size · unlabeled_batch_size`` unlabeled indices from the streams and keeps its
    own slice of each part (rank r: positions ``r · size`` to ``(r + 1) · size − 1``). So the
    ranks' shares of a batch are disjoint (within a pass), their union is exactly the batch a
    single process draws with the global batch sizes and the same seed, and a run can resume
    with another number of processes. The default epoch length counts global batches:
    ``len(labeled_indices) // (world_size · labeled_batch_size)``.
    """

    def __init__(
        self,
        labeled_indices: Sequence[int],
        unlabeled_indices: Sequence[int],
        labeled_batch_size: int,
        unlabeled_batch_size: int,
        *,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.world_size = _check_count("world_size", get_world_size() if world_size is None else world_size, 1)
        self.rank = _check_count("rank", get_rank() if rank is None else rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}); got {self.rank}")
        self.labeled_batch_size = _check_count("labeled_batch_size", labeled_batch_size, 1)
        self.unlabeled_batch_size = _check_count("unlabeled_batch_size", unlabeled_batch_size, 0)
        self.labeled = np.asarray(list(labeled_indices), dtype=np.int64)
        self.unlabeled = np.asarray(list(unlabeled_indices), dtype=np.int64)
        if self.labeled.size == 0:
            raise ValueError("labeled_indices is empty")
        if self.unlabeled_batch_size and self.unlabeled.size == 0:
            raise ValueError("unlabeled_indices is empty but unlabeled_batch_size > 0")
        overlap = np.intersect1d(self.labeled, self.unlabeled)
        if overlap.size:
            raise ValueError(f"labeled and unlabeled indices overlap, e.g. {overlap[:3].tolist()}")
        if num_batches is None:
            global_labeled = self.labeled_batch_size * self.world_size
            if len(self.labeled) < global_labeled:
                raise ValueError(
                    f"{len(self.labeled)} labeled indices make no full batch of {global_labeled} "
                    f"(labeled_batch_size {self.labeled_batch_size} x world_size {self.world_size}); "
                    "lower labeled_batch_size or pass num_batches"
                )
            self.num_batches = len(self.labeled) // global_labeled
        else:
            self.num_batches = _check_count("num_batches", num_batches, 1)
        self.seed = _check_count("seed", seed, 0)
        self.epoch = 0

    @classmethod
    def for_concat(
        cls, n_labeled: int, n_unlabeled: int, labeled_batch_size: int, unlabeled_batch_size: int, **kwargs
    ) -> TwoStreamBatchSampler:
        """Sampler for ``ConcatDataset([labeled, unlabeled])`` of sizes ``n_labeled`` and ``n_unlabeled``."""
        return cls(
            range(n_labeled),
            range(n_labeled, n_labeled + n_unlabeled),
            labeled_batch_size,
            unlabeled_batch_size,
            **kwargs,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_count("epoch", epoch, 0)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        world, rank = self.world_size, self.rank
        labeled = _stream(self.labeled, self.seed, 0, epoch * self.num_batches * self.labeled_batch_size * world)
        unlabeled = (
            _stream(self.unlabeled, self.seed, 1, epoch * self.num_batches * self.unlabeled_batch_size * world)
            if self.unlabeled_batch_size
            else iter(())
        )
        for _ in range(self.num_batches):
            batch = []
            for stream, size in ((labeled, self.labeled_batch_size), (unlabeled, self.unlabeled_batch_size)):
                part = [next(stream) for _ in range(size * world)]  # the global batch's part
                batch += part[rank * size:(rank + 1) * size]
            yield batch
