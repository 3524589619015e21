"""Faults under gather_distributed=True on 2 gloo processes: nothing hangs, nothing aborts.

Checked: every gathering loss on a rank whose batch has no usable anchor still joins the
collectives (the other rank's loss is the one of its own anchors, the empty rank's an attached 0
with zero gradient); ranks that disagree on the embedding size or dtype get the same clear
``ValueError`` on every rank, before any row is exchanged, and the process group stays usable.
"""

import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from gloo_processes import rank_results

from contrastkit import cross_level_contrast, gather_keys, global_contrast, pseudo_label_contrast, supcon_loss

WORLD = 2
DIM = 6
IGNORE = -1


def batch(rank):
    generator = torch.Generator().manual_seed(10 + rank)
    return {
        "features": torch.randn(4, 2, DIM, dtype=torch.float64, generator=generator),
        "labels": torch.tensor([0, 1, 0, 2]),
        # one slice per volume and partition, two views each
        "z": torch.randn(8, DIM, dtype=torch.float64, generator=generator),
        "volume": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]) + 2 * rank,
        "partition": torch.tensor([0, 0, 1, 1, 0, 0, 1, 1]),
        "view": torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]),
        "pixels": torch.randn(2, DIM, 3, 4, dtype=torch.float64, generator=generator),
        "pixel_labels": torch.randint(1, 3, (2, 3, 4), generator=generator),
    }


def leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


def run_losses(data, rank):
    """Each gathering loss, rank 1 without a usable anchor; (loss, gradient) per loss."""
    empty = rank == 1
    out = {}
    (features,) = leaves(data["features"])
    labels = torch.full_like(data["labels"], IGNORE) if empty else data["labels"]
    loss = supcon_loss(features, labels, gather_distributed=True, ignore_index=IGNORE)
    loss.backward()
    out["supcon"] = (loss.detach(), features.grad)

    # GR: a slice's other view is its positive; rank 1 sends one view per slice only (view 0 of
    # partition 0) — no anchor of its own has a positive, yet its rows are negatives of rank 0's.
    rows = slice(0, 1) if empty else slice(None)
    (z,) = leaves(data["z"][rows])
    loss = global_contrast(z, data["volume"][rows], data["partition"][rows], data["view"][rows], strategy="GR",
                           gather_distributed=True)
    loss.backward()
    out["global_GR"] = (loss.detach(), z.grad)

    (pixels,) = leaves(data["pixels"])
    pixel_labels = torch.zeros_like(data["pixel_labels"]) if empty else data["pixel_labels"]
    loss = pseudo_label_contrast(pixels, pixel_labels, mode="pixel", gather_distributed=True)
    loss.backward()
    out["pixel"] = (loss.detach(), pixels.grad)
    return out


def fault_worker(rank, port, out_dir):
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    try:
        data = batch(rank)
        result = {"losses": run_losses(data, rank)}
        errors = {}
        for name, keys in (("size", torch.randn(3, DIM + rank)),
                           ("dtype", torch.randn(3, DIM, dtype=torch.float16 if rank else torch.float32))):
            try:
                gather_keys(keys, torch.arange(3))
            except ValueError as err:
                errors[name] = str(err)
        try:  # the same through a loss: a rank on float32 beside one on float64
            cells = torch.randn(1, DIM, 2, 2, dtype=torch.float32 if rank else torch.float64)
            cross_level_contrast(cells, cells, negatives="batch", gather_distributed=True)
        except ValueError as err:
            errors["loss"] = str(err)
        result["errors"] = errors
        # The group is still whole: a collective after the errors completes.
        result["after"] = gather_keys(torch.full((1, 2), float(rank)))[0]
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp_faults"))
    return rank_results(fault_worker, out_dir, WORLD)


def _rank0_alone_rank1_zero(results, name, want, leaf):
    """Rank 0's loss and gradient are ``want``'s, the single-process loss of its own batch (rank 1
    adds nothing), and rank 1's are exactly 0."""
    want.backward()
    loss, grad = results[0]["losses"][name]
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(grad, leaf.grad)
    loss, grad = results[1]["losses"][name]
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_supcon_with_a_rank_whose_labels_are_all_ignored(results):
    # Rank 1's rows are neither anchors nor keys: rank 0's loss is the one of its own batch.
    data = batch(0)
    (features,) = leaves(data["features"])
    _rank0_alone_rank1_zero(results, "supcon", supcon_loss(features, data["labels"], ignore_index=IGNORE), features)


def test_global_contrast_with_a_rank_without_positives(results):
    # Rank 1's one row has no positive: its loss is 0, but the row is a negative of rank 0's anchors.
    data, other = batch(0), batch(1)
    z = torch.cat([data["z"], other["z"][:1]]).requires_grad_(True)
    cat = {name: torch.cat([data[name], other[name][:1]]) for name in ("volume", "partition", "view")}
    rows = global_contrast(z, cat["volume"], cat["partition"], cat["view"], strategy="GR")
    # The single-process loss averages over its 8 anchors with a positive (rank 0's rows): rank 0's loss.
    rows.backward()
    loss, grad = results[0]["losses"]["global_GR"]
    torch.testing.assert_close(loss, rows.detach())
    torch.testing.assert_close(grad, z.grad[:8])
    loss, grad = results[1]["losses"]["global_GR"]
    assert loss.item() == 0.0 and torch.isfinite(grad).all()
    torch.testing.assert_close(grad, z.grad[8:])  # its gradient as a negative of rank 0's anchors


def test_pixel_mode_with_an_all_background_rank(results):
    data = batch(0)
    (pixels,) = leaves(data["pixels"])
    _rank0_alone_rank1_zero(results, "pixel", pseudo_label_contrast(pixels, data["pixel_labels"], mode="pixel"), pixels)


@pytest.mark.parametrize("fault, words", [
    ("size", ["keys", "rank 0: torch.float32 with 2 dims, trailing shape (6,)", "rank 1:", "(7,)"]),
    ("dtype", ["keys", "rank 0: torch.float32", "rank 1: torch.float16"]),
    ("loss", ["keys", "torch.float64", "torch.float32"]),
])
def test_ranks_that_disagree_get_the_same_clear_error_and_the_group_survives(results, fault, words):
    messages = [result["errors"].get(fault) for result in results]
    assert messages[0] is not None and messages[0] == messages[1]  # every rank raises, none aborts
    for word in words:
        assert word in messages[0]
    for result in results:
        torch.testing.assert_close(result["after"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
