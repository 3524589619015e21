"""Seeded splits (determinism, disjointness, fractions, JSON round trip) and the two-stream sampler."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from contrastkit.data import Split, TwoStreamBatchSampler, make_split

IDS = [f"case_{i:04d}" for i in range(998)]


def test_same_seed_same_split_any_input_order():
    a = make_split(IDS, seed=3, labeled=0.2)
    b = make_split(list(reversed(IDS)), seed=3, labeled=0.2)
    assert a == b
    assert make_split(IDS, seed=4, labeled=0.2).test != a.test


def test_parts_disjoint_cover_and_sizes():
    split = make_split(IDS, seed=0, val=0.1, test=0.1, labeled=0.1)
    parts = [split.train_labeled, split.train_unlabeled, split.val, split.test]
    assert sorted(sum(parts, [])) == IDS  # disjoint and complete
    # round half up: 99.8 -> 100 test, 100 val, 798 train, 79.8 -> 80 labeled
    assert [len(p) for p in parts] == [80, 718, 100, 100]
    assert split.train == sorted(split.train_labeled + split.train_unlabeled)
    assert all(p == sorted(p) for p in parts)


def test_labeled_sets_are_nested_and_tiny_fractions_keep_one():
    ten = make_split(IDS, seed=1, labeled=0.1)
    twenty = make_split(IDS, seed=1, labeled=0.2)
    assert set(ten.train_labeled) < set(twenty.train_labeled)
    assert ten.test == twenty.test and ten.val == twenty.val
    assert len(make_split(IDS[:10], seed=0, val=0.0, test=0.0, labeled=0.01).train_labeled) == 1
    assert make_split(IDS[:10], labeled=0.0).train_labeled == []


def test_split_order_is_pinned():
    # The order is that of sha256("<seed>:<id>") hex digests, recomputed here independently.
    import hashlib

    keys = {i: hashlib.sha256(f"0:{i}".encode()).hexdigest() for i in "abc"}
    expected_test = min(keys, key=keys.get)
    split = make_split(["a", "b", "c"], seed=0, val=1 / 3, test=1 / 3)
    assert split.test == [expected_test]


def test_json_round_trip_and_format(tmp_path):
    split = make_split(IDS, seed=7, labeled=0.25)
    path = split.save(tmp_path / "sub" / "split.json")
    data = json.loads(path.read_text())
    assert data["format"] == "contrastkit-split/1" and data["seed"] == 7
    assert data["fractions"] == {"val": 0.1, "test": 0.1, "labeled": 0.25}
    assert Split.load(path) == split


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Split.load(bad)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        Split.load(bad)
    data = make_split(IDS[:20]).to_dict()
    data["val"] = data["val"] + data["test"][:1]
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="disjoint"):
        Split.load(bad)


def test_split_argument_errors():
    with pytest.raises(ValueError, match="val"):
        make_split(IDS, val=1.5)
    with pytest.raises(ValueError, match="at most 1"):
        make_split(IDS, val=0.6, test=0.6)
    with pytest.raises(ValueError, match="duplicates"):
        make_split(["a", "a"])
    with pytest.raises(TypeError, match="seed"):
        make_split(IDS, seed=1.5)


def test_sampler_batch_composition_and_epoch_length():
    labeled, unlabeled = list(range(10)), list(range(10, 17))
    sampler = TwoStreamBatchSampler(labeled, unlabeled, 3, 4)
    assert len(sampler) == 3  # 10 // 3 labeled batches
    batches = list(sampler)
    assert len(batches) == 3
    for batch in batches:
        assert len(batch) == 7
        assert all(i in labeled for i in batch[:3]) and all(i in unlabeled for i in batch[3:])
    first_nine = [i for b in batches for i in b[:3]]
    assert len(set(first_nine)) == 9  # no labeled repeat within a pass


def test_unlabeled_stream_cycles_through_permutations():
    unlabeled = list(range(100, 105))
    sampler = TwoStreamBatchSampler(range(6), unlabeled, 1, 3, num_batches=10)
    stream = [i for b in sampler for i in b[1:]]  # 30 draws = 6 full passes
    passes = [stream[k : k + 5] for k in range(0, 30, 5)]
    assert all(sorted(p) == unlabeled for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # each pass is its own permutation
    # the labeled stream also cycles when num_batches asks for more than one pass
    labeled_stream = [b[0] for b in TwoStreamBatchSampler(range(6), unlabeled, 1, 3, num_batches=12)]
    assert sorted(labeled_stream[:6]) == sorted(labeled_stream[6:]) == list(range(6))


def test_streams_continue_across_epochs_and_resume():
    sampler = TwoStreamBatchSampler(range(8), range(8, 28), 2, 2, seed=5)  # 4 batches per epoch
    epoch0, epoch1 = list(sampler), list(sampler)
    unlabeled = [i for b in epoch0 + epoch1 for i in b[2:]]
    # 16 draws from one pass of 20 continued across the epoch boundary: no repeats
    assert len(set(unlabeled)) == 16 and set(unlabeled) <= set(range(8, 28))
    resumed = TwoStreamBatchSampler(range(8), range(8, 28), 2, 2, seed=5)
    resumed.set_epoch(1)
    assert list(resumed) == epoch1
    assert list(TwoStreamBatchSampler(range(8), range(8, 28), 2, 2, seed=6)) != epoch0


def test_sampler_drives_a_dataloader_over_concat():
    labeled = TensorDataset(torch.zeros(6, 1))
    unlabeled = TensorDataset(torch.ones(9, 1))
    sampler = TwoStreamBatchSampler.for_concat(6, 9, 2, 3)
    loader = DataLoader(ConcatDataset([labeled, unlabeled]), batch_sampler=sampler)
    for (x,) in loader:
        assert x[:2].eq(0).all() and x[2:].eq(1).all() and len(x) == 5


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="labeled_batch_size"):
        TwoStreamBatchSampler(range(4), range(4, 8), 0, 2)
    with pytest.raises(ValueError, match="overlap"):
        TwoStreamBatchSampler(range(4), range(3, 8), 1, 1)
    with pytest.raises(ValueError, match="unlabeled_indices is empty"):
        TwoStreamBatchSampler(range(4), [], 1, 1)
    with pytest.raises(ValueError, match="no full batch"):
        TwoStreamBatchSampler(range(2), range(2, 8), 3, 1)
    assert [len(b) for b in TwoStreamBatchSampler(range(4), [], 2, 0)] == [2, 2]


def test_ranks_split_each_global_batch_disjointly():
    # 3 ranks x (2 labeled + 3 unlabeled) against one process drawing the global 6 + 9.
    labeled, unlabeled = range(12), range(12, 40)
    single = TwoStreamBatchSampler(labeled, unlabeled, 6, 9, seed=4, rank=0, world_size=1)
    ranks = [TwoStreamBatchSampler(labeled, unlabeled, 2, 3, seed=4, rank=r, world_size=3) for r in range(3)]
    assert len(single) == 2 and all(len(s) == 2 for s in ranks)  # 12 labeled // (2 x 3)
    for epoch in (0, 1, 5):
        single.set_epoch(epoch)
        for sampler in ranks:
            sampler.set_epoch(epoch)
        for batch, *shares in zip(single, *ranks, strict=True):
            assert all(len(share) == 5 for share in shares)
            assert sum((share[:2] for share in shares), []) == batch[:6]  # labeled parts, rank by rank
            assert sum((share[2:] for share in shares), []) == batch[6:]  # unlabeled parts
            assert len(set(batch[:6])) == 6  # within a pass the shares never overlap
    # Without a process group the defaults are one process: the former behaviour exactly.
    default = TwoStreamBatchSampler(labeled, unlabeled, 6, 9, seed=4)
    assert (default.rank, default.world_size) == (0, 1) and list(default) == list(
        TwoStreamBatchSampler(labeled, unlabeled, 6, 9, seed=4, rank=0, world_size=1))


def test_ranks_supervised_only_and_resume():
    ranks = [TwoStreamBatchSampler(range(10), [], 1, 0, num_batches=3, seed=2, rank=r, world_size=2)
             for r in range(2)]
    single = TwoStreamBatchSampler(range(10), [], 2, 0, num_batches=3, seed=2, world_size=1)
    for sampler in (*ranks, single):
        sampler.set_epoch(3)
    assert [a + b for a, b in zip(*ranks, strict=True)] == list(single)


def test_rank_argument_errors():
    with pytest.raises(ValueError, match="rank"):
        TwoStreamBatchSampler(range(8), range(8, 12), 1, 1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        TwoStreamBatchSampler(range(8), range(8, 12), 1, 1, rank=-1, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        TwoStreamBatchSampler(range(8), range(8, 12), 1, 1, rank=0, world_size=0)
    with pytest.raises(ValueError, match="world_size 4"):  # 3 labeled make no global batch of 4
        TwoStreamBatchSampler(range(3), range(3, 12), 1, 1, rank=0, world_size=4)
