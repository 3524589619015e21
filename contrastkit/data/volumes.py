"""Volume-aware batches for the global contrast of Chaitanya et al. (NeurIPS 2020).

The global loss (:class:`contrastkit.GlobalContrast`) needs, for every slice of a batch, the volume
it comes from and its partition: each volume is cut into ``num_partitions`` equal partitions along
the slice axis, and slice ``i`` of a volume of ``S`` slices lies in partition ``floor(i * P / S)``
(:func:`contrastkit.global_local.partition_of`). :class:`PartitionBatchSampler` draws batches that
hold several volumes with one slice from each of their partitions, and tells the ids of any batch.

Slice names carry the volume and the slice number: ``patient001_frame01_slice_3`` (the ACDC HDF5
copy, numbered from 1), ``case003_slice_5`` (the synthetic hearts, from 0), ``<volume>_slice_<k>``
(NIfTI, from 0). :func:`slice_positions` reads them: the first slice of a volume is the lowest
number it has, and a volume's slices must be consecutive (a gap would shift the partitions).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ..global_local import partition_of, sample_partition_slices
from .sampler import _check_count, _stream

_SLICE = re.compile(r"^(?P<volume>.+)_slice_(?P<index>\d+)$")


def slice_positions(names: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Where each named slice lies in its volume.

    Returns ``(volumes, volume_index, slice_index, num_slices)``: the distinct volume names in order of
    first appearance, and per name the position of its volume in that list, its slice position (0 at
    the volume's lowest slice number) and its volume's slice count. Raises ValueError for a name
    without ``_slice_<k>``, a slice named twice or a volume whose slice numbers have a gap.
    """
    if isinstance(names, str):
        raise TypeError("names must be a sequence of slice names; got a str")
    names = list(names)
    if not names:
        raise ValueError("names is empty: give the slice names of at least one volume")
    volumes: dict[str, list[int]] = {}
    parsed = []
    for name in names:
        match = _SLICE.match(name) if isinstance(name, str) else None
        if match is None:
            raise ValueError(f"names: {name!r} is not a slice name <volume>_slice_<k>")
        parsed.append((match["volume"], int(match["index"])))
        volumes.setdefault(match["volume"], []).append(int(match["index"]))
    first, count = {}, {}
    for volume, numbers in volumes.items():
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"names: volume {volume!r} names a slice twice")
        low, high = min(numbers), max(numbers)
        if high - low + 1 != len(numbers):
            missing = sorted(set(range(low, high + 1)) - set(numbers))
            raise ValueError(f"names: volume {volume!r} lacks slices {missing[:5]} between {low} and {high}; "
                             "partitions need a volume's every slice")
        first[volume], count[volume] = low, len(numbers)
    order = {volume: k for k, volume in enumerate(volumes)}
    volume_index = np.array([order[v] for v, _ in parsed], dtype=np.int64)
    slice_index = np.array([k - first[v] for v, k in parsed], dtype=np.int64)
    num_slices = np.array([count[v] for v, _ in parsed], dtype=np.int64)
    return list(volumes), volume_index, slice_index, num_slices


class PartitionBatchSampler(Sampler[list[int]]):
    """Batches of ``volumes_per_batch`` volumes with one slice from each of their ``num_partitions``
    partitions: ``volumes_per_batch * num_partitions`` indices into the data set whose slices are
    ``names``, volume-major (a volume's partitions 0, 1, ... in a row).

    Volumes come from an endless stream of passes, each a fresh permutation of the volumes (as
    :class:`TwoStreamBatchSampler` draws), and no batch holds a volume twice (a batch straddling two
    passes skips a repeat); within each partition the slice is drawn uniformly
    (:func:`contrastkit.global_local.sample_partition_slices`). Everything depends only on ``seed``
    and the epoch (:meth:`set_epoch`; the counter advances at each ``iter()``), so a resumed run draws
    the batches an uninterrupted one drew.

    :meth:`batch_ids` gives the ``(volume_ids, partition_ids)`` of any batch for
    :class:`contrastkit.GlobalContrast`: volume ids are positions in :attr:`volumes` (data-set wide),
    partition ids ``floor(i * P / S)`` for slice position ``i`` of a volume of ``S`` slices.
    Volumes with fewer than ``num_partitions`` slices cannot fill their partitions: they are left
    out (listed in :attr:`skipped`); at least ``volumes_per_batch`` must remain.
    """

    def __init__(self, names: Sequence[str], volumes_per_batch: int, num_partitions: int = 4, *,
                 num_batches: int = 1, seed: int = 0) -> None:
        self.volumes_per_batch = _check_count("volumes_per_batch", volumes_per_batch, 1)
        self.num_partitions = _check_count("num_partitions", num_partitions, 1)
        self.num_batches = _check_count("num_batches", num_batches, 1)
        self.seed = _check_count("seed", seed, 0)
        self.volumes, self.volume_of, self.slice_of, self.size_of = slice_positions(names)
        # per volume: its slice count and the data-set index of each of its slice positions
        self.sizes = np.zeros(len(self.volumes), dtype=np.int64)
        self.sizes[self.volume_of] = self.size_of
        self._members = [np.empty(s, dtype=np.int64) for s in self.sizes]
        for index, (volume, position) in enumerate(zip(self.volume_of, self.slice_of, strict=True)):
            self._members[volume][position] = index
        usable = self.sizes >= self.num_partitions
        self.skipped = [v for v, ok in zip(self.volumes, usable, strict=True) if not ok]
        self._usable = np.flatnonzero(usable)
        if len(self._usable) < self.volumes_per_batch:
            raise ValueError(f"volumes_per_batch={self.volumes_per_batch} but only {len(self._usable)} of the "
                             f"{len(self.volumes)} volumes have num_partitions={self.num_partitions} slices or more")
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        return self.volumes_per_batch * self.num_partitions

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_count("epoch", epoch, 0)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        # A stream position per volume slot; skipped repeats consume positions, so start each
        # epoch from its own offset of a stream long enough for it.
        stream = _stream(self._usable, self.seed, 2, epoch * self.num_batches * self.volumes_per_batch)
        for b in range(self.num_batches):
            chosen: list[int] = []
            while len(chosen) < self.volumes_per_batch:
                volume = next(stream)
                if volume not in chosen:
                    chosen.append(volume)
            state = np.random.SeedSequence([self.seed, 3, epoch, b]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(state))
            volume_pos, _, position = sample_partition_slices([int(self.sizes[v]) for v in chosen],
                                                              self.num_partitions, generator)
            yield [int(self._members[chosen[v]][p]) for v, p in zip(volume_pos.tolist(), position.tolist(),
                                                                     strict=True)]

    def batch_ids(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(volume_ids, partition_ids)``, int64 tensors, of the slices at data-set ``indices``."""
        index = torch.as_tensor(np.asarray(list(indices), dtype=np.int64))
        if index.numel() and (index.min() < 0 or index.max() >= len(self.volume_of)):
            raise ValueError(f"indices must lie in [0, {len(self.volume_of)}); got {index.tolist()[:8]}")
        volumes = torch.from_numpy(self.volume_of)[index]
        partitions = partition_of(torch.from_numpy(self.slice_of)[index], torch.from_numpy(self.size_of)[index],
                                  self.num_partitions)
        return volumes, partitions
