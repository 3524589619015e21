"""gather_distributed=True on 2 gloo processes (CPU, loopback) against one process over the global batch.

Documented convention checked here: each rank returns the mean over its own anchors, computed
against the keys of all ranks; the gradient on a rank's inputs is the gradient of the sum of the
per-rank losses (DDP's averaging then yields the gradient of their mean).
"""

import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from gloo_processes import rank_results

from contrastkit import (
    MemoryQueue,
    cross_level_contrast,
    gather_keys,
    global_contrast,
    info_nce,
    nt_xent_loss,
    pseudo_label_contrast,
    supcon_loss,
)
from contrastkit.distributed import get_rank, get_world_size, is_distributed

WORLD = 2
SAMPLES = (3, 4)  # unequal on purpose: the gathering pads and strips
DIM = 5


def global_data():
    generator = torch.Generator().manual_seed(0)
    n = sum(SAMPLES)
    return {
        "z1": torch.randn(n, DIM, dtype=torch.float64, generator=generator),
        "z2": torch.randn(n, DIM, dtype=torch.float64, generator=generator),
        "features": torch.randn(n, 2, DIM, dtype=torch.float64, generator=generator),
        "labels": torch.tensor([0, 1, 2, 1, 0, 3, 2]),
        "queue_keys": torch.randn(n, DIM, dtype=torch.float64, generator=generator),
        "queue_labels": torch.tensor([3, 3, 0, 4, 1, 0, 2]),
        "slices": torch.randn(2 * WORLD, 2 * 2, DIM, dtype=torch.float64, generator=generator),
        # (images, C, gh, gw) global and local cell embeddings, one image per sample
        "global_cells": torch.randn(n, DIM, 2, 3, dtype=torch.float64, generator=generator),
        "local_cells": torch.randn(n, DIM, 2, 3, dtype=torch.float64, generator=generator),
        # (images, D, H, W) pixel embeddings, label maps with background and ignored pixels, confidence
        "pixels": torch.randn(n, DIM, 3, 4, dtype=torch.float64, generator=generator),
        "pixel_labels": torch.randint(-1, 3, (n, 3, 4), generator=generator),
        "pixel_confidence": torch.rand(n, 3, 4, dtype=torch.float64, generator=generator),
    }


def local_rows(rank):
    start = sum(SAMPLES[:rank])
    return slice(start, start + SAMPLES[rank])


def slice_batch(slices, ranks):
    """Per rank: 2 volumes x 2 partitions x 2 views, volume ids dataset-wide, views concatenated."""
    z, volume, partition, view = [], [], [], []
    for rank in ranks:
        block = slices[2 * rank:2 * rank + 2]  # (volumes, partitions * views, D)
        for v in range(2):
            for p in range(2):
                for w in range(2):
                    z.append(block[v, 2 * p + w])
                    volume.append(2 * rank + v)
                    partition.append(p)
                    view.append(w)
    return torch.stack(z), torch.tensor(volume), torch.tensor(partition), torch.tensor(view)


def worker(rank, port, out_dir):
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    try:
        data, mine = global_data(), local_rows(rank)
        result = {"rank": get_rank(), "world": get_world_size(), "distributed": is_distributed()}

        keys = data["z1"][mine].clone().requires_grad_(True)
        all_keys, all_labels, none, offset = gather_keys(keys, data["labels"][mine], None)
        (all_keys * torch.arange(1, all_keys.shape[0] + 1, dtype=torch.float64)[:, None]).sum().backward()
        result["gather"] = (all_keys.detach(), all_labels, none, offset, keys.grad)

        z1 = data["z1"][mine].clone().requires_grad_(True)
        z2 = data["z2"][mine].clone().requires_grad_(True)
        loss = nt_xent_loss(z1, z2, gather_distributed=True)
        loss.backward()
        result["ntxent"] = (loss.detach(), z1.grad, z2.grad)

        features = data["features"][mine].clone().requires_grad_(True)
        loss = supcon_loss(features, data["labels"][mine], gather_distributed=True)
        loss.backward()
        result["supcon"] = (loss.detach(), features.grad)

        queue = MemoryQueue(5, DIM, dtype=torch.float64)
        queue.enqueue(data["queue_keys"][mine], labels=data["queue_labels"][mine])
        result["queue"] = (queue.keys, queue.labels)
        features = data["features"][mine].clone().requires_grad_(True)
        loss = supcon_loss(features, data["labels"][mine], gather_distributed=True, queue=queue)
        loss.backward()
        result["supcon_queue"] = (loss.detach(), features.grad)

        for strategy in ("GR", "GD-", "GD"):
            z, volume, partition, view = slice_batch(data["slices"], [rank])
            z.requires_grad_(True)
            loss = global_contrast(z, volume, partition, view, strategy=strategy, gather_distributed=True)
            loss.backward()
            result[strategy] = (loss.detach(), z.grad)
        for symmetric in (False, True):
            global_cells = data["global_cells"][mine].clone().requires_grad_(True)
            local_cells = data["local_cells"][mine].clone().requires_grad_(True)
            loss = cross_level_contrast(global_cells, local_cells, negatives="batch", detach_local=False,
                                        symmetric=symmetric, gather_distributed=True)
            loss.backward()
            result[f"cross_level_{symmetric}"] = (loss.detach(), global_cells.grad, local_cells.grad)
        pixels = data["pixels"][mine].clone().requires_grad_(True)
        loss = pseudo_label_contrast(pixels, data["pixel_labels"][mine], data["pixel_confidence"][mine],
                                     mode="pixel", gather_distributed=True)
        loss.backward()
        result["pixel"] = (loss.detach(), pixels.grad)
        # A rank whose batch holds no usable pixel (all background) must still join the gather.
        for name, extra in (("counted", {}), ("slotted", {"anchors_per_class": 12, "num_classes": 3})):
            labels = data["pixel_labels"][mine].clone()
            if rank == 1:
                labels[:] = 0
            pixels = data["pixels"][mine].clone().requires_grad_(True)
            loss = pseudo_label_contrast(pixels, labels, mode="pixel", gather_distributed=True, **extra)
            loss.backward()
            result[f"pixel_empty_{name}"] = (loss.detach(), pixels.grad)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    return rank_results(worker, out_dir, WORLD)


def per_rank_means(per_row, owner):
    """Mean of per-anchor losses over each rank's anchors; their sum is what each rank differentiates."""
    means = [per_row[owner == r].mean() for r in range(WORLD)]
    return means, sum(means)


def test_single_process_fallback():
    keys = torch.randn(3, 2)
    out = gather_keys(keys, torch.arange(3))
    assert out[0] is keys and out[2] == 0 and not is_distributed() and get_world_size() == 1


def test_gather_keys_concatenates_and_routes_gradients(results):
    data = global_data()
    for rank, result in enumerate(results):
        all_keys, all_labels, none, offset, grad = result["gather"]
        assert result["distributed"] and result["rank"] == rank and result["world"] == WORLD
        torch.testing.assert_close(all_keys, data["z1"])
        assert torch.equal(all_labels, data["labels"]) and none is None
        assert offset == sum(SAMPLES[:rank])
        # Each rank weighted row j of the gathered keys by j + 1: the summed gradient is WORLD * (j + 1).
        rows = torch.arange(offset, offset + SAMPLES[rank], dtype=torch.float64) + 1
        torch.testing.assert_close(grad, WORLD * rows[:, None].expand(-1, DIM))


def test_ntxent_matches_single_process(results):
    data = global_data()
    z1, z2 = data["z1"].clone().requires_grad_(True), data["z2"].clone().requires_grad_(True)
    owner = torch.cat([torch.full((n,), r) for r, n in enumerate(SAMPLES)]).repeat(2)
    means, objective = per_rank_means(nt_xent_loss(z1, z2, reduction="none"), owner)
    objective.backward()
    for rank, result in enumerate(results):
        loss, g1, g2 = result["ntxent"]
        torch.testing.assert_close(loss, means[rank].detach())
        torch.testing.assert_close(g1, z1.grad[local_rows(rank)])
        torch.testing.assert_close(g2, z2.grad[local_rows(rank)])


@pytest.mark.parametrize("with_queue", [False, True])
def test_supcon_matches_single_process(results, with_queue):
    data = global_data()
    features = data["features"].clone().requires_grad_(True)
    queue = None
    if with_queue:
        queue = MemoryQueue(5, DIM, dtype=torch.float64)
        queue.enqueue(data["queue_keys"], labels=data["queue_labels"])
        for result in results:  # every rank holds the same queue, the newest rows of rank 0 then rank 1
            torch.testing.assert_close(result["queue"][0], queue.keys)
            assert torch.equal(result["queue"][1], queue.labels)
    per_row = supcon_loss(features, data["labels"], reduction="none", queue=queue)  # (N, V)
    owner = torch.cat([torch.full((n,), r) for r, n in enumerate(SAMPLES)])[:, None].expand(-1, 2)
    means, objective = per_rank_means(per_row, owner)  # with 2 views every anchor has a positive
    objective.backward()
    for rank, result in enumerate(results):
        loss, grad = result["supcon_queue" if with_queue else "supcon"]
        torch.testing.assert_close(loss, means[rank].detach())
        torch.testing.assert_close(grad, features.grad[local_rows(rank)])


@pytest.mark.parametrize("strategy", ["GR", "GD-", "GD"])
def test_global_contrast_matches_single_process(results, strategy):
    # Equal per-rank batches in which every anchor has a positive: the mean of the per-rank
    # losses is the global loss, and each rank's gradient is WORLD times the global one.
    data = global_data()
    z, volume, partition, view = slice_batch(data["slices"], range(WORLD))
    z.requires_grad_(True)
    global_loss = global_contrast(z, volume, partition, view, strategy=strategy)
    global_loss.backward()
    losses = [result[strategy][0] for result in results]
    torch.testing.assert_close(sum(losses) / WORLD, global_loss.detach())
    rows = z.shape[0] // WORLD
    for rank, result in enumerate(results):
        torch.testing.assert_close(result[strategy][1], WORLD * z.grad[rank * rows:(rank + 1) * rows])


@pytest.mark.parametrize("symmetric", [False, True])
def test_cross_level_batch_negatives_match_single_process(results, symmetric):
    data = global_data()
    global_cells = data["global_cells"].clone().requires_grad_(True)
    local_cells = data["local_cells"].clone().requires_grad_(True)
    cells = 2 * 3
    owner = torch.cat([torch.full((n * cells,), r) for r, n in enumerate(SAMPLES)])
    q = global_cells.permute(0, 2, 3, 1).reshape(-1, DIM)
    k = local_cells.permute(0, 2, 3, 1).reshape(-1, DIM)
    # Each direction: the mean over the rank's own cells against every cell of the global batch.
    means, objective = per_rank_means(info_nce(q, k, reduction="none", temperature=0.07), owner)
    if symmetric:
        back, back_objective = per_rank_means(info_nce(k, q, reduction="none", temperature=0.07), owner)
        means = [0.5 * (a + b) for a, b in zip(means, back, strict=True)]
        objective = 0.5 * (objective + back_objective)
    objective.backward()
    for rank, result in enumerate(results):
        loss, global_grad, local_grad = result[f"cross_level_{symmetric}"]
        mine = local_rows(rank)
        torch.testing.assert_close(loss, means[rank].detach())
        torch.testing.assert_close(global_grad, global_cells.grad[mine])
        torch.testing.assert_close(local_grad, local_cells.grad[mine])


def test_pseudo_label_pixel_mode_matches_single_process(results):
    # The usable pixels of every rank are keys; each rank: confidence-weighted mean over its anchors.
    data = global_data()
    pixels = data["pixels"].clone().requires_grad_(True)
    labels, confidence = data["pixel_labels"], data["pixel_confidence"]
    usable = ((labels != -1) & (labels != 0)).reshape(-1)
    rows = pixels.permute(0, 2, 3, 1).reshape(-1, DIM)[usable]
    weights = confidence.reshape(-1)[usable]
    owner = torch.cat([torch.full((n * 12,), r) for r, n in enumerate(SAMPLES)])[usable]
    per_row = info_nce(rows, labels=labels.reshape(-1)[usable], weights=weights, reduction="none")
    valid = info_nce(rows, labels=labels.reshape(-1)[usable], reduction="none") != 0
    means = [per_row[owner == r].sum() / weights[(owner == r) & valid].sum() for r in range(WORLD)]
    sum(means).backward()
    for rank, result in enumerate(results):
        loss, grad = result["pixel"]
        torch.testing.assert_close(loss, means[rank].detach())
        torch.testing.assert_close(grad, pixels.grad[local_rows(rank)])


@pytest.mark.parametrize("path", ["counted", "slotted"])
def test_pixel_mode_with_a_rank_without_usable_pixels_does_not_hang(results, path):
    # Rank 1's batch is all background: it returns an attached 0, and rank 0's loss is the one of
    # its own pixels (rank 1 sent only rows that take no part).
    data = global_data()
    mine = local_rows(0)
    pixels = data["pixels"][mine].clone().requires_grad_(True)
    want = pseudo_label_contrast(pixels, data["pixel_labels"][mine], mode="pixel")
    want.backward()
    loss, grad = results[0][f"pixel_empty_{path}"]
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(grad, pixels.grad)
    loss, grad = results[1][f"pixel_empty_{path}"]
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
