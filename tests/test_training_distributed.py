"""The training helpers on 2 gloo processes (CPU, loopback) against one process over the global batch.

Checked: ``init_distributed`` joins the group torchrun would describe (environment variables);
``sum_over_ranks`` sums values and routes gradients; the segmentation losses with
``gather_distributed=True`` give the global batch's loss (mean over ranks) and, on each rank,
``world_size`` times the global gradient of its own rows (DDP's averaging then gives the global
gradient); the rank helpers and the sampler's defaults follow the process group; ``prepare_model``
wraps in DDP and checkpoints stay plain.
"""

import os
import sys
import time

import pytest
import torch
from gloo_processes import free_port, rank_results, run_processes

from contrastkit.data import TwoStreamBatchSampler
from contrastkit.segmentation import bce_dice_loss, dice_ce_loss
from contrastkit.training import (
    barrier,
    broadcast_object,
    cleanup_distributed,
    distributed_run,
    init_distributed,
    is_main_process,
    mean_over_ranks,
    prepare_model,
    save_checkpoint,
    unwrap_model,
)

WORLD = 2
SHARES = (1, 3)  # images per rank, unequal on purpose: the global means must not assume equal shares


def global_batch():
    generator = torch.Generator().manual_seed(0)
    n = sum(SHARES)
    labels = torch.randint(0, 3, (n, 5, 5), generator=generator)
    labels[1, :2] = -1  # ignored pixels, on rank 1 only
    return {
        "binary_logits": torch.randn(n, 1, 5, 5, dtype=torch.float64, generator=generator),
        "binary_mask": (torch.rand(n, 1, 5, 5, generator=generator) > 0.5).double(),
        "logits": torch.randn(n, 3, 5, 5, dtype=torch.float64, generator=generator),
        "labels": labels,
    }


def rows(rank):
    start = sum(SHARES[:rank])
    return slice(start, start + SHARES[rank])


def worker(rank, port, out_dir):
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    context = init_distributed("cpu", timeout_s=30)
    try:
        from contrastkit.distributed import sum_over_ranks

        result = {"context": (context.rank, context.world_size, context.local_rank, str(context.device),
                              context.owns_group)}
        result["joined"] = init_distributed("cpu").owns_group  # a second call joins the existing group

        x = (torch.arange(3, dtype=torch.float64) * (rank + 1)).requires_grad_(True)
        total = sum_over_ranks(x)
        (total * torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64) * (rank + 1)).sum().backward()
        result["sum"] = (total.detach(), x.grad, sum_over_ranks(torch.ones(2)))

        data = global_batch()
        logits = data["binary_logits"][rows(rank)].clone().requires_grad_(True)
        loss = bce_dice_loss(logits, data["binary_mask"][rows(rank)], gather_distributed=True)
        loss.backward()
        result["bce_dice"] = (loss.detach(), logits.grad)
        logits = data["logits"][rows(rank)].clone().requires_grad_(True)
        loss = dice_ce_loss(logits, data["labels"][rows(rank)], gather_distributed=True)
        loss.backward()
        result["dice_ce"] = (loss.detach(), logits.grad)
        result["local_bce_dice"] = bce_dice_loss(data["binary_logits"][rows(rank)], data["binary_mask"][rows(rank)])

        result["mean"] = mean_over_ranks({"b": float(rank), "a": 10.0 * rank})
        result["main"] = is_main_process()
        result["broadcast"] = broadcast_object({"from": rank}, src=1)
        sampler = TwoStreamBatchSampler(range(8), range(8, 20), 2, 1, seed=3)
        result["sampler"] = (sampler.rank, sampler.world_size, list(sampler))

        torch.manual_seed(0)
        model, train_model = prepare_model(torch.nn.Linear(2, 1), context)
        result["ddp"] = (type(train_model).__name__, unwrap_model(train_model) is model)
        if rank == 0:
            save_checkpoint(os.path.join(out_dir, "ddp.pt"), train_model)
        barrier()
        result["checkpoint_keys"] = sorted(torch.load(os.path.join(out_dir, "ddp.pt"), weights_only=False)["model"])
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup_distributed(context)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp_training"))
    return rank_results(worker, out_dir, WORLD, weights_only=False)


def test_init_distributed_reads_the_torchrun_environment(results):
    for rank, result in enumerate(results):
        assert result["context"] == (rank, WORLD, rank, "cpu", True)
        assert result["joined"] is False  # the existing group is used, and left to its owner


def test_sum_over_ranks_values_and_gradients(results):
    for result in results:
        total, grad, constant = result["sum"]
        torch.testing.assert_close(total, torch.arange(3, dtype=torch.float64) * 3)  # (1 + 2) * [0, 1, 2]
        # Rank k's loss weighs the sum by w * (k + 1): our rows get the sum over ranks, w * 3.
        torch.testing.assert_close(grad, torch.tensor([3.0, 30.0, 300.0], dtype=torch.float64))
        assert torch.equal(constant, torch.full((2,), 2.0))


@pytest.mark.parametrize("name", ["bce_dice", "dice_ce"])
def test_gathered_segmentation_losses_are_the_global_batch_loss(results, name):
    data = global_batch()
    if name == "bce_dice":
        logits = data["binary_logits"].clone().requires_grad_(True)
        loss = bce_dice_loss(logits, data["binary_mask"])
    else:
        logits = data["logits"].clone().requires_grad_(True)
        loss = dice_ce_loss(logits, data["labels"])
    loss.backward()
    losses = [result[name][0] for result in results]
    torch.testing.assert_close(sum(losses) / WORLD, loss.detach())  # the mean of the rank losses
    for rank, result in enumerate(results):
        torch.testing.assert_close(result[name][1], WORLD * logits.grad[rows(rank)])
    # Without gathering, a rank's Dice covers its own images only: not the global loss.
    local = [result["local_bce_dice"] for result in results]
    assert abs(float(sum(local) / WORLD - bce_dice_loss(data["binary_logits"], data["binary_mask"]))) > 1e-3


def test_rank_helpers_and_sampler_defaults_follow_the_group(results):
    single = TwoStreamBatchSampler(range(8), range(8, 20), 2 * WORLD, 1 * WORLD, seed=3, rank=0, world_size=1)
    for rank, result in enumerate(results):
        assert result["mean"] == {"b": 0.5, "a": 5.0} and list(result["mean"]) == ["b", "a"]
        assert result["main"] is (rank == 0)
        assert result["broadcast"] == {"from": 1}
        sampler_rank, world, batches = result["sampler"]
        assert (sampler_rank, world) == (rank, WORLD) and len(batches) == 2  # 8 labeled // (2 x 2 ranks)
    # The ranks' shares of each batch are disjoint and together the single-process batch.
    for step, batch in enumerate(single):
        shares = [result["sampler"][2][step] for result in results]
        assert shares[0][:2] + shares[1][:2] == batch[:4] and shares[0][2:] + shares[1][2:] == batch[4:]


def test_prepare_model_wraps_ddp_and_checkpoints_stay_plain(results):
    for result in results:
        assert result["ddp"] == ("DistributedDataParallel", True)
        assert result["checkpoint_keys"] == ["bias", "weight"]


def leaving_worker(rank, port, out_dir, fail):
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    record = {}
    try:
        with distributed_run("cpu", timeout_s=30) as context:
            model, train_model = prepare_model(torch.nn.Linear(2, 1), context)
            train_model(torch.ones(3, 2)).sum().backward()
            if rank == 0:
                time.sleep(1.0)  # rank 0 alone evaluates and writes files; rank 1 has nothing left to do
            record["done"] = time.monotonic()
            if fail:
                raise ValueError(f"rank {rank} fails")
    except ValueError as err:
        record["error"] = str(err)
    record["left"] = time.monotonic()
    record["group_ended"] = not torch.distributed.is_initialized()
    # the traceback still refers to the wrapper; its reducer must not outlive the group to the exit
    record["reducer_released"] = train_model.reducer is None and model.weight.shape == (1, 2)
    torch.save(record, os.path.join(out_dir, f"leave{rank}.pt"))


@pytest.mark.parametrize("fail", [False, True], ids=["completed", "raised"])
def test_distributed_run_ranks_leave_together_and_errors_end_the_group(tmp_path, fail):
    run_processes(leaving_worker, (free_port(), str(tmp_path), fail), nprocs=WORLD)
    records = [torch.load(tmp_path / f"leave{r}.pt") for r in range(WORLD)]
    assert all(r["group_ended"] and r["reducer_released"] for r in records)
    if fail:  # no barrier on the way out: rank 1 does not wait for the slow rank 0
        assert [r["error"] for r in records] == ["rank 0 fails", "rank 1 fails"]
        assert records[1]["left"] < records[0]["done"]
    else:  # the early rank waits until the last rank has finished its work
        assert records[1]["left"] >= records[0]["done"]
