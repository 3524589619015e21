"""contrastkit.data.volumes: slice positions from names, and partition batches for the global contrast."""

import math

import pytest
import torch

from contrastkit import GlobalContrast
from contrastkit.data import PartitionBatchSampler, SyntheticCardiac, find_acdc_root, slice_positions


def names_of(sizes, first=0, prefix="patient{:03d}_frame01"):
    """Slice names of volumes of ``sizes`` slices, numbered from ``first``, listed in a shuffled order."""
    names = [f"{prefix.format(v)}_slice_{first + k}" for v, s in enumerate(sizes) for k in range(s)]
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(0)).tolist()
    return [names[i] for i in order]


def definition(name, names, partitions):
    """Volume, slice position and partition of ``name`` straight from the definitions: the slice's
    number minus its volume's lowest, and floor(i * P / S) for a volume of S slices."""
    volume, number = name.rsplit("_slice_", 1)
    numbers = [int(n.rsplit("_slice_", 1)[1]) for n in names if n.rsplit("_slice_", 1)[0] == volume]
    position, size = int(number) - min(numbers), len(numbers)
    return volume, position, math.floor(position * partitions / size)


def test_slice_positions_read_acdc_and_synthetic_names():
    acdc = ["patient001_frame01_slice_2", "patient001_frame01_slice_1", "patient002_frame12_slice_1",
            "patient001_frame01_slice_3"]
    volumes, volume, position, size = slice_positions(acdc)
    assert volumes == ["patient001_frame01", "patient002_frame12"]
    assert volume.tolist() == [0, 0, 1, 0] and position.tolist() == [1, 0, 0, 2] and size.tolist() == [3, 3, 1, 3]
    synthetic = SyntheticCardiac(3, 5, size=32).names
    volumes, volume, position, size = slice_positions(synthetic)
    assert volumes == ["case000", "case001", "case002"]
    assert position.tolist() == list(range(5)) * 3 and set(size.tolist()) == {5}


@pytest.mark.parametrize("names, match", [
    (["a_slice_0", "a_slice_2"], "lacks slices \\[1\\]"),
    (["a_slice_1", "a_slice_1"], "names a slice twice"),
    (["a_slice_0", "volume_b"], "'volume_b' is not a slice name"),
    ([], "names is empty"),
])
def test_slice_positions_refuse_names_that_cannot_give_partitions(names, match):
    with pytest.raises(ValueError, match=match):
        slice_positions(names)
    with pytest.raises(TypeError, match="names must be a sequence"):
        slice_positions("a_slice_0")


@pytest.mark.parametrize("partitions, first", [(4, 1), (3, 0), (1, 0)])
def test_batches_hold_one_slice_per_partition_of_distinct_volumes(partitions, first):
    sizes = [6, 7, 9, 10, 16, 18, 8]
    names = names_of(sizes, first)
    sampler = PartitionBatchSampler(names, 3, partitions, num_batches=5, seed=1)
    assert sampler.batch_size == 3 * partitions and sampler.volumes == list(dict.fromkeys(
        n.rsplit("_slice_", 1)[0] for n in names))
    batches = list(sampler)
    assert len(batches) == 5
    for batch in batches:
        volume_ids, partition_ids = sampler.batch_ids(batch)
        want = [definition(names[i], names, partitions) for i in batch]
        assert [sampler.volumes[v] for v in volume_ids.tolist()] == [w[0] for w in want]
        assert partition_ids.tolist() == [w[2] for w in want]
        # volume-major: each of 3 distinct volumes with its partitions 0..P-1 in a row
        assert partition_ids.tolist() == list(range(partitions)) * 3
        assert len(set(volume_ids.tolist())) == 3
        assert volume_ids.tolist() == [v for v in volume_ids.tolist()[::partitions] for _ in range(partitions)]


def test_gd_positives_of_a_batch_are_the_same_partition_of_every_volume():
    names = names_of([8, 9, 12, 10, 11], first=1)
    partitions = 4
    sampler = PartitionBatchSampler(names, 2, partitions, seed=3)
    batch = next(iter(sampler))
    volume_ids, partition_ids = sampler.batch_ids(batch)
    want = [definition(names[i], names, partitions) for i in batch]
    n = len(batch)
    # two views: GD's positives of anchor a are every other view-slice of a's partition
    parts = partition_ids.repeat(2)
    positives = (parts[:, None] == parts[None, :]) & ~torch.eye(2 * n, dtype=torch.bool)
    defined = torch.tensor([[i != j and want[i % n][2] == want[j % n][2] for j in range(2 * n)]
                            for i in range(2 * n)])
    assert torch.equal(positives, defined)
    assert positives.sum(1).tolist() == [3] * (2 * n)  # the other view, and both views of the other volume
    # and the loss takes the ids as they are, under every strategy (GR needs unique (volume, partition, view))
    z = torch.randn(2 * n, 8)
    views = torch.arange(2).repeat_interleave(n)
    for strategy in ("GR", "GD-", "GD"):
        loss = GlobalContrast(strategy)(z, volume_ids.repeat(2), parts, views)
        assert torch.isfinite(loss)
    # GD: pulling each partition's slices onto one point brings the loss down
    aligned = torch.nn.functional.one_hot(parts, partitions).float() + 0.01 * z[:, :partitions]
    assert GlobalContrast("GD")(aligned, volume_ids.repeat(2), parts, views) < \
        GlobalContrast("GD")(z, volume_ids.repeat(2), parts, views)


def test_batches_depend_on_seed_and_epoch_only():
    names = names_of([8, 9, 12, 10, 11, 7])
    a = PartitionBatchSampler(names, 2, 4, num_batches=3, seed=5)
    first, second = list(a), list(a)
    assert first != second  # the epoch advanced
    b = PartitionBatchSampler(names, 2, 4, num_batches=3, seed=5)
    b.set_epoch(1)
    assert list(b) == second
    assert list(PartitionBatchSampler(names, 2, 4, num_batches=3, seed=6)) != first
    # over a pass, every volume comes once before any comes twice
    c = PartitionBatchSampler(names, 3, 2, num_batches=2, seed=0)
    seen = [c.batch_ids(batch)[0][::2].tolist() for batch in c]
    assert sorted(seen[0] + seen[1]) == list(range(6))


def test_short_volumes_are_left_out_and_bad_arguments_are_named():
    names = names_of([3, 8, 9])
    sampler = PartitionBatchSampler(names, 2, 4)
    assert sampler.skipped == ["patient000_frame01"]
    assert all(sampler.volumes[v] != "patient000_frame01" for b in [next(iter(sampler))]
               for v in sampler.batch_ids(b)[0].tolist())
    with pytest.raises(ValueError, match="volumes_per_batch=3 but only 2 of the 3 volumes"):
        PartitionBatchSampler(names, 3, 4)
    for kwargs, match in (({"volumes_per_batch": 0}, "volumes_per_batch must be an int >= 1"),
                          ({"num_partitions": "4"}, "num_partitions must be an int >= 1"),
                          ({"seed": -1}, "seed must be an int >= 0"),
                          ({"num_batches": 1.5}, "num_batches must be an int >= 1")):
        with pytest.raises(ValueError, match=match):
            PartitionBatchSampler(names, **{"volumes_per_batch": 1, **kwargs})
    with pytest.raises(ValueError, match="indices must lie in"):
        sampler.batch_ids([0, len(names)])


def test_real_acdc_training_volumes():
    root = find_acdc_root()
    if root is None:
        pytest.skip("no ACDC copy: set $CONTRASTKIT_DATA to the folder holding acdc/")
    from contrastkit.data.acdc import read_list

    names = read_list(root, "train_slices")
    sampler = PartitionBatchSampler(names, 3, 4, num_batches=4)
    assert len(sampler.volumes) == 140 and sampler.skipped == []
    for batch in sampler:
        _, partition_ids = sampler.batch_ids(batch)
        assert partition_ids.tolist() == [definition(names[i], names, 4)[2] for i in batch]
