"""Global and local contrast (Chaitanya et al. 2020) against float64 formulas written here."""

import math

import pytest
import torch

from contrastkit import (
    GlobalContrast,
    LocalContrast,
    MemoryQueue,
    global_contrast,
    local_contrast,
    partition_of,
    sample_partition_slices,
)


def cosine(a, b):
    a = a.double() / a.double().norm(dim=1, keepdim=True)
    b = b.double() / b.double().norm(dim=1, keepdim=True)
    return a @ b.T


def each_positive_loss(s_row, positives, negatives):
    """-(1/|P|) sum_p log( e^{s_p} / (e^{s_p} + sum_n e^{s_n}) )."""
    negative_mass = sum(math.exp(s_row[n]) for n in negatives)
    return -sum(s_row[p] - math.log(math.exp(s_row[p]) + negative_mass) for p in positives) / len(positives)


def global_formula(z, volume, partition, view, strategy, tau, queue_keys=None, queue_partitions=None):
    keys = z if queue_keys is None else torch.cat([z, queue_keys])
    s = (cosine(z, keys) / tau).tolist()
    n = z.shape[0]
    losses = []
    for i in range(n):
        positives, negatives = [], []
        for j in range(n):
            if j == i:
                continue
            same_slice = volume[j] == volume[i] and partition[j] == partition[i]
            same_partition = partition[j] == partition[i]
            if strategy == "GD":
                (positives if same_partition else negatives).append(j)
            elif same_slice:
                positives.append(j)
            elif strategy == "GR" or not same_partition:
                negatives.append(j)
        for q in range(0 if queue_keys is None else queue_keys.shape[0]):
            j = n + q
            same_partition = queue_partitions[q] == partition[i]
            if strategy == "GR" or not same_partition:
                negatives.append(j)
            elif strategy == "GD":
                positives.append(j)
        if positives:
            losses.append(each_positive_loss(s[i], positives, negatives))
    return sum(losses) / len(losses) if losses else 0.0


def two_view_batch(volumes=3, partitions=3, dim=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    volume, partition, _ = sample_partition_slices([10, 7, 12][:volumes], partitions, generator)
    n = volume.shape[0]
    z = torch.randn(2 * n, dim, dtype=torch.float64, generator=generator)
    return z, volume.repeat(2), partition.repeat(2), torch.arange(2).repeat_interleave(n)


@pytest.mark.parametrize("strategy", ["GR", "GD-", "GD"])
def test_global_contrast_matches_formula(strategy):
    z, volume, partition, view = two_view_batch()
    loss = GlobalContrast(strategy=strategy, temperature=0.2)(z, volume, partition, view)
    expected = global_formula(z, volume.tolist(), partition.tolist(), view.tolist(), strategy, 0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_strategies_differ_and_default_is_gd():
    z, volume, partition, view = two_view_batch(seed=1)
    values = {s: global_contrast(z, volume, partition, view, strategy=s).item() for s in ["GR", "GD-", "GD"]}
    assert len(set(values.values())) == 3
    assert GlobalContrast()(z, volume, partition, view).item() == values["GD"]


@pytest.mark.parametrize("strategy", ["GR", "GD-", "GD"])
def test_global_contrast_with_queue_matches_formula(strategy):
    z, volume, partition, view = two_view_batch(volumes=2, seed=2)
    queue = MemoryQueue(6, 5, dtype=torch.float64)
    past, past_partitions = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    queue.enqueue(past, labels=past_partitions)
    loss = global_contrast(z, volume, partition, view, strategy=strategy, queue=queue)
    expected = global_formula(z, volume.tolist(), partition.tolist(), view.tolist(), strategy, 0.1,
                              past, past_partitions.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("strategy", ["GR", "GD-", "GD"])
def test_global_contrast_gradcheck(strategy):
    z, volume, partition, view = two_view_batch(volumes=2, partitions=2, dim=3, seed=3)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: global_contrast(x, volume, partition, view, strategy=strategy), (z,)
    )


def test_global_contrast_degenerate_batches():
    z = torch.randn(3, 4, requires_grad=True)
    ids = torch.arange(3)
    zero = torch.zeros(3, dtype=torch.long)
    # One view of three slices of one partition each: no positive for GR and GD-.
    for strategy in ("GR", "GD-"):
        loss = global_contrast(z, ids, zero, zero, strategy=strategy)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
    # GD with one partition: everything is positive, no negative; the loss is finite.
    assert torch.isfinite(global_contrast(z, ids, zero, zero, strategy="GD"))


def test_global_contrast_bad_input():
    z, volume, partition, view = two_view_batch(volumes=2, partitions=2)
    with pytest.raises(ValueError, match="strategy"):
        global_contrast(z, volume, partition, view, strategy="GD+")
    with pytest.raises(ValueError, match="triple must appear once"):
        global_contrast(z, volume, partition, torch.zeros_like(view), strategy="GR")
    with pytest.raises(ValueError, match="partition_ids must hold one entry"):
        global_contrast(z, volume, partition[:-1], view)
    with pytest.raises(ValueError, match="volume_ids must be non-negative"):
        global_contrast(z, -1 - volume, partition, view)
    with pytest.raises(ValueError, match=r"z must be \(N, D\)"):
        global_contrast(z[None], volume, partition, view)
    queue = MemoryQueue(4, 5, dtype=torch.float64)
    queue.enqueue(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs a queue that holds labels"):
        global_contrast(z, volume, partition, view, strategy="GD", queue=queue)
    global_contrast(z, volume, partition, view, strategy="GR", queue=queue)  # GR needs no labels


def test_sampler_draws_one_slice_per_partition_per_volume():
    counts = [10, 7, 4]
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        volume, partition, slice_index = sample_partition_slices(counts, 4, generator)
        assert volume.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert partition.tolist() == [0, 1, 2, 3] * 3
        sizes = torch.tensor(counts)[volume]
        assert ((slice_index >= 0) & (slice_index < sizes)).all()
        torch.testing.assert_close(partition_of(slice_index, sizes, 4), partition)
        seen.update(zip(volume.tolist(), slice_index.tolist(), strict=True))
    assert seen == {(v, s) for v, count in enumerate(counts) for s in range(count)}  # every slice reachable
    with pytest.raises(ValueError, match="must be an int >= num_partitions"):
        sample_partition_slices([10, 3], 4)
    with pytest.raises(ValueError, match="num_partitions"):
        sample_partition_slices([10], 0)


def region_rows(f, grid):
    """(C, H, W) -> (R, C) cell means, row-major, written with explicit slicing."""
    c, h, w = f.shape
    ph, pw = h // grid[0], w // grid[1]
    return torch.stack([
        f[:, r * ph:(r + 1) * ph, col * pw:(col + 1) * pw].mean(dim=(1, 2))
        for r in range(grid[0]) for col in range(grid[1])
    ])


def local_formula(f1, f2, grid, tau, k=None, extra_keys=None):
    losses = []
    for image in range(f1.shape[0]):
        x = torch.cat([region_rows(f1[image].double(), grid), region_rows(f2[image].double(), grid)])
        r = x.shape[0] // 2
        keys = x if extra_keys is None else torch.cat([x, extra_keys.double()])
        s = cosine(x, keys) / tau
        for i in range(2 * r):
            partner = (i + r) % (2 * r)
            negatives = [j for j in range(keys.shape[0]) if j not in (i, partner)]
            if k is not None:
                negatives = sorted(negatives, key=lambda j: -s[i, j].item())[:k]
            losses.append(each_positive_loss(s[i].tolist(), [partner], negatives))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("grid,k", [((2, 2), None), ((3, 2), None), ((2, 2), 3), ((3, 2), 1)])
def test_local_contrast_matches_formula(grid, k):
    torch.manual_seed(4)
    f1, f2 = torch.randn(2, 4, 6, 4, dtype=torch.float64), torch.randn(2, 4, 6, 4, dtype=torch.float64)
    loss = LocalContrast(temperature=0.3, region_grid=grid, negatives_per_region=k)(f1, f2)
    assert loss.item() == pytest.approx(local_formula(f1, f2, grid, 0.3, k), rel=1e-10)


@pytest.mark.parametrize("k", [None, 4])
def test_local_contrast_queue_keys_join_the_negatives(k):
    torch.manual_seed(5)
    f1, f2 = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    queue = MemoryQueue(5, 3, dtype=torch.float64)
    past = torch.randn(5, 3, dtype=torch.float64)
    queue.enqueue(past)
    loss = local_contrast(f1, f2, region_grid=2, negatives_per_region=k, queue=queue)
    assert loss.item() == pytest.approx(local_formula(f1, f2, (2, 2), 0.1, k, past), rel=1e-10)


@pytest.mark.parametrize("k", [None, 2])
def test_local_contrast_gradcheck(k):
    torch.manual_seed(6)
    f1 = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: local_contrast(a, b, region_grid=2, negatives_per_region=k), (f1, f2)
    )


def test_local_contrast_half_precision_and_bad_input():
    torch.manual_seed(7)
    f1, f2 = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8)
    full = local_contrast(f1, f2)
    half = local_contrast(f1.bfloat16(), f2.bfloat16())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(full.item(), rel=2e-2)
    with pytest.raises(ValueError, match="negatives_per_region must be None or an int in"):
        local_contrast(f1, f2, region_grid=2, negatives_per_region=7)
    with pytest.raises(ValueError, match="negatives_per_region"):
        LocalContrast(negatives_per_region=0)
    with pytest.raises(ValueError, match="grid"):
        local_contrast(f1, f2, region_grid=3)
    with pytest.raises(ValueError, match="same shape"):
        local_contrast(f1, f2[:1])


# --- one core call for the batch, equal to v1's per-image loops ------------------------------------

def v1_local_contrast(f1, f2, grid, tau, k=None, queued=None):
    """v1's LocalContrast: one info_nce call per image (kept here as the oracle of the grouped call)."""
    import torch.nn.functional as F

    from contrastkit import info_nce, pool_patches

    regions = grid[0] * grid[1]
    b = f1.shape[0]
    rows = torch.cat([pool_patches(f1, grid).flatten(2), pool_patches(f2, grid).flatten(2)], dim=2).transpose(1, 2)
    extra = 0 if queued is None else queued.shape[0]
    region = torch.arange(regions).repeat(2)
    partner = (torch.arange(2 * regions) + regions) % (2 * regions)
    total = 0.0
    for image in range(b):
        candidates = rows[image] if queued is None else torch.cat([rows[image], queued])
        if k is None:
            key_labels = region if queued is None else torch.cat([region, region.new_full((extra,), regions)])
            total = total + info_nce(rows[image], candidates, labels=region, key_labels=key_labels,
                                     self_key_offset=0, temperature=tau, reduction="sum")
        else:
            with torch.no_grad():
                similarity = F.normalize(rows[image], dim=1) @ F.normalize(candidates, dim=1).T
                own = torch.arange(2 * regions)
                similarity[own, own] = float("-inf")
                similarity[own, partner] = float("-inf")
                nearest = similarity.topk(k, dim=1).indices
            chosen = torch.cat([partner[:, None], nearest], dim=1)
            owner = torch.arange(2 * regions)
            total = total + info_nce(rows[image], candidates[chosen.reshape(-1)], labels=torch.zeros_like(owner),
                                     key_labels=(torch.arange(k + 1) > 0).long().repeat(2 * regions),
                                     groups=owner, key_groups=owner.repeat_interleave(k + 1), temperature=tau,
                                     reduction="sum")
    return total / (b * 2 * regions)


def v1_gd_minus(z, volume, partition, tau, queued=None, queued_partitions=None):
    """v1's GlobalContrast(strategy="GD-"): one info_nce call per slice."""
    from contrastkit import info_nce

    _, slices = torch.unique(torch.stack([volume, partition], 1), dim=0, return_inverse=True)
    total, contributing = 0.0, 0
    for s in torch.unique(slices).tolist():
        rows = (slices == s).nonzero().squeeze(1)
        negatives = [z[partition != partition[rows[0]]]]
        if queued is not None:
            negatives.append(queued[queued_partitions != partition[rows[0]]])
        slice_keys = torch.cat([z[rows], *negatives])
        key_labels = (torch.arange(slice_keys.shape[0]) >= rows.shape[0]).long()
        total = total + info_nce(z[rows], slice_keys, labels=torch.zeros_like(rows), key_labels=key_labels,
                                 self_key_offset=0, reduction="sum", temperature=tau, denominator="each_positive")
        contributing += rows.shape[0] if rows.shape[0] > 1 else 0
    return total / max(contributing, 1)


def count_core_calls(monkeypatch, module):
    import contrastkit.core

    calls = []
    original = contrastkit.core.info_nce
    monkeypatch.setattr(module, "info_nce", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("with_queue", [False, True])
def test_local_contrast_is_one_call_equal_to_the_v1_loop(monkeypatch, k, with_queue):
    import contrastkit.global_local as module

    g = torch.Generator().manual_seed(11)
    f1 = torch.randn(3, 4, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    f2 = torch.randn(3, 4, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    queue = None
    if with_queue:
        queue = MemoryQueue(7, 4, dtype=torch.float64)
        queue.enqueue(torch.randn(7, 4, dtype=torch.float64, generator=g))
    want = v1_local_contrast(f1, f2, (3, 2), 0.2, k, None if queue is None else queue.keys)
    calls = count_core_calls(monkeypatch, module)
    got = local_contrast(f1, f2, region_grid=(3, 2), temperature=0.2, negatives_per_region=k, queue=queue)
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    for a, b in zip(torch.autograd.grad(got, (f1, f2)), torch.autograd.grad(want, (f1, f2)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("with_queue", [False, True])
def test_gd_minus_is_one_call_equal_to_the_v1_loop(monkeypatch, with_queue):
    import contrastkit.global_local as module

    z, volume, partition, view = two_view_batch(seed=3)
    z.requires_grad_(True)
    queue, queued, queued_partitions = None, None, None
    if with_queue:
        queue = MemoryQueue(6, z.shape[1], dtype=torch.float64)
        queued_partitions = torch.tensor([0, 1, 2, 0, 2, 2])
        queue.enqueue(torch.randn(6, z.shape[1], dtype=torch.float64), labels=queued_partitions)
        queued = queue.keys
    want = v1_gd_minus(z, volume, partition, 0.1, queued, queued_partitions)
    calls = count_core_calls(monkeypatch, module)
    got = global_contrast(z, volume, partition, view, strategy="GD-", queue=queue)
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0],
                               rtol=1e-12, atol=1e-13)
