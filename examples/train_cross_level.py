"""Semi-supervised polyp segmentation with cross-level contrast and consistency (Zhao et al., ISBI 2022).

    python examples/train_cross_level.py                       # synthetic polyps, a few minutes on a CPU
    python examples/train_cross_level.py --data ../shared/data/kvasir-seg --image-size 128 --grid 4
    torchrun --nproc_per_node=2 examples/train_cross_level.py --preset clcc-kvasir --data DIR --amp bf16

Each batch holds labeled and unlabeled images. The supervised loss (BCE + soft Dice) uses the
labeled ones; the cross-level terms use all of them. ``--schedule sequential`` is the original:
supervised + contrast during the warm-up, then supervised + consistency; ``joint`` uses all
three terms all along. ``--method supervised`` trains on the labeled images alone (the baseline).
Under torchrun every process takes an equal share of each batch (``--batch`` and
``--labeled-batch`` count the whole step); rank 0 evaluates, prints and writes the files.
There is no ``--init``: the global + local pre-training of ``pretrain_global_local.py`` needs
volumes (its global loss contrasts partitions along the slice axis) and trains a one-channel U-Net,
while these are single RGB images with a three-channel input; its weights would not fit here.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from presets import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    add_preset_argument,
    add_run_arguments,
    apply_preset,
    check_resume,
    flag,
    make_optimizer,
    ranged,
)
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset
from tqdm import tqdm

from contrastkit import CrossLevelConsistency, CrossLevelContrast, cross_level_views
from contrastkit.data import PairedAugment, SegmentationFolder, SyntheticPolyps, TwoStreamBatchSampler, make_split
from contrastkit.metrics import aggregate, binary_metrics, dice, format_summary, precision, recall
from contrastkit.models import UNet
from contrastkit.segmentation import bce_dice_loss
from contrastkit.training import (
    History,
    LRSchedule,
    MixedPrecision,
    TimeBudget,
    barrier,
    broadcast_object,
    checkpoint_state,
    code_version,
    config_changes,
    derived_seed,
    distributed_run,
    load_checkpoint,
    mean_over_ranks,
    prepare_model,
    resume_run,
    save_run,
    seed_everything,
    world_size_from_env,
)
from contrastkit.viz import training_figure


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_preset_argument(p, "train_cross_level")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a folder with images/ and masks/")
    p.add_argument("--mask-suffix", default="", help="mask of image <id> is masks/<id><suffix>.* "
                   "('_segmentation' for ISIC 2018); for --data and --test-data")
    p.add_argument("--test-data", action="append", default=None, metavar="DIR",
                   help="repeatable: after training, also test the best checkpoint on this images/ + masks/ folder")
    p.add_argument("--synthetic-size", type=POSITIVE_INT, default=400,
                   help="number of synthetic images; the split needs at least 5 (10%% validation, 10%% test)")
    p.add_argument("--labeled-fraction", type=ranged(float, 0, 1, open_low=True), default=0.1,
                   help="labeled share of the training images, in (0, 1]; 1 only with --method supervised")
    p.add_argument("--method", choices=("supervised", "cross_level"), default="cross_level")
    p.add_argument("--schedule", choices=("sequential", "joint"), default="sequential")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=0.3, help="sequential: contrast phase length, "
                   "a fraction of the iterations (< 1) or iterations (>= 1); 0: consistency from the start")
    p.add_argument("--image-size", type=POSITIVE_INT, default=64, help="an int >= 1, divided by --grid")
    p.add_argument("--grid", type=POSITIVE_INT, default=2,
                   help="patches per side, an int >= 1; image-size/grid must divide by 2^depth")
    p.add_argument("--width", type=POSITIVE_INT, default=16, help="U-Net base width, an int >= 1")
    p.add_argument("--depth", type=COUNT, default=3, help="U-Net poolings, an int >= 0")
    p.add_argument("--iterations", type=POSITIVE_INT, default=None, help="optimizer steps, an int >= 1 (default 300)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=None,
                   help="alternative to --iterations: passes over the labeled set, an int >= 1")
    p.add_argument("--eval-every", type=POSITIVE_INT, default=50,
                   help="validate and checkpoint every K iterations, an int >= 1")
    p.add_argument("--batch", type=POSITIVE_INT, default=8, help="images per batch, >= --labeled-batch")
    p.add_argument("--labeled-batch", type=POSITIVE_INT, default=4, help="labeled images per batch, an int >= 1")
    p.add_argument("--negatives", choices=("image", "batch"), default="image",
                   help="contrast negatives: the other patches of the image, or of the whole (global) batch")
    p.add_argument("--contrast-weight", type=NON_NEGATIVE, default=0.1, help=">= 0")
    p.add_argument("--consistency-weight", type=NON_NEGATIVE, default=1.0,
                   help=">= 0, times gh*gw: the original sums the per-patch mean over the cells")
    p.add_argument("--temperature", type=POSITIVE, default=0.07, help="> 0")
    p.add_argument("--patch-batchnorm", choices=("batch", "batch_no_update", "running"),
                   default="batch_no_update",
                   help="BatchNorm in the patch pass: its own statistics without updating the running ones (so "
                        "the running ones stay the full images'), its own also entering the running ones (the "
                        "original code), or the full images' running statistics")
    p.add_argument("--split-seed", type=COUNT, default=0, help="seeds the train/val/test split, an int >= 0")
    # GroupNorm by default: BatchNorm over 4 labeled + 4 unlabeled images and a separate patch pass
    # ends the default run at test Dice ~0.33 where GroupNorm reaches ~0.66 (seeds 0-2, 64x64)
    add_run_arguments(p, lr=3e-3, out="runs/cross_level", norm="group")
    args = apply_preset(p, p.parse_args(argv), argv)
    check_args(p, args, world_size_from_env())
    check_resume(p, args)
    return args


def check_args(parser, args, world):
    """Flag combinations that cannot train, reported before anything is loaded."""
    if args.image_size % args.grid:
        parser.error(f"{flag(args, 'grid')} does not divide {flag(args, 'image_size')}")
    patch = args.image_size // args.grid
    if patch % 2**args.depth:
        parser.error(f"patches of {patch} pixels (--image-size / --grid) are not a multiple of 2^{args.depth} = "
                     f"{2**args.depth}, which {flag(args, 'depth')} requires; given {flag(args, 'image_size')}, "
                     f"{flag(args, 'grid')}")
    unlabeled = args.batch - args.labeled_batch if args.method == "cross_level" else 0
    if args.labeled_batch < 1 or unlabeled < 0:
        parser.error(f"need 1 <= {flag(args, 'labeled_batch')} <= {flag(args, 'batch')}")
    if world > args.labeled_batch:
        parser.error(f"{world} processes but {flag(args, 'labeled_batch')}: every process needs at least "
                     "one labeled image per batch (raise --labeled-batch or lower torchrun's --nproc_per_node)")
    for dest, count in (("labeled_batch", args.labeled_batch), ("batch", unlabeled)):
        if count % world:
            what = flag(args, dest) if dest == "labeled_batch" else f"the {unlabeled} unlabeled images per batch"
            parser.error(f"{what} cannot be split evenly over {world} processes")
    if args.sync_bn and (args.norm != "batch" or (world > 1 and not args.device.startswith("cuda"))):
        parser.error("--sync-bn needs --norm batch and, under torchrun, CUDA devices")
    for folder in ([] if args.data == "synthetic" else [args.data]) + (args.test_data or []):
        try:
            SegmentationFolder(folder, mask_suffix=args.mask_suffix)
        except (OSError, ValueError) as err:
            option = "--data" if folder == args.data else "--test-data"
            parser.error(f"{option} {folder}: {err}")
    parts = dict(zip(("labeled", "unlabeled", "validation", "test"), map(len, split_ids(args)), strict=True))
    empty = [name for name, size in parts.items() if not size and (name != "unlabeled" or args.method == "cross_level")]
    if empty:
        source = flag(args, "synthetic_size") if args.data == "synthetic" else f"--data {args.data}"
        why = []
        if set(empty) - {"unlabeled"}:
            why.append("validation and test take 10% of the images each, so at least 5 images")
        if "unlabeled" in empty:
            why.append("--method cross_level needs unlabeled images: a --labeled-fraction below 1")
        parser.error(f"{source} with {flag(args, 'labeled_fraction')} leaves no {' and no '.join(empty)} images "
                     f"({parts}); {'; '.join(why)}")


def split_ids(args):
    """The train-labeled, train-unlabeled, val and test ids of ``--data`` (synthetic: image indices)."""
    ids = ([str(i) for i in range(args.synthetic_size)] if args.data == "synthetic"
           else SegmentationFolder(args.data, mask_suffix=args.mask_suffix).ids)
    split = make_split(ids, seed=args.split_seed, val=0.1, test=0.1, labeled=args.labeled_fraction)
    return split.train_labeled, split.train_unlabeled, split.val, split.test


def load_data(args):
    """Train-labeled, train-unlabeled, val and test sets, held in memory as tensors."""
    if args.data == "synthetic":
        source = SyntheticPolyps(args.synthetic_size, size=args.image_size, seed=1234)
        load = lambda part: [source[int(i)] for i in part]  # noqa: E731
    else:
        def load(part):
            folder = SegmentationFolder(args.data, size=args.image_size, ids=part, mask_suffix=args.mask_suffix)
            return [folder[i] for i in range(len(folder))]
    parts = [load(part) for part in split_ids(args)]
    # The supervised baseline may label every training image: its unlabeled set is empty, of the same shapes.
    shapes = [t.shape for t in parts[0][0]]
    return [TensorDataset(*(torch.stack(t) for t in zip(*items, strict=True))) if items
            else TensorDataset(*(torch.empty(0, *shape) for shape in shapes)) for items in parts]


def make_loader(args, labeled, unlabeled, context):
    """Batches of labeled images then unlabeled ones (this process's share); one sampler epoch per evaluation."""
    # The baseline sees the same labeled images per step and nothing else.
    unlabeled_batch = args.batch - args.labeled_batch if args.method == "cross_level" else 0
    world = context.world_size
    sampler = TwoStreamBatchSampler.for_concat(len(labeled), len(unlabeled), args.labeled_batch // world,
                                               unlabeled_batch // world, num_batches=args.eval_every, seed=args.seed,
                                               rank=context.rank, world_size=world)
    return sampler, DataLoader(ConcatDataset([labeled, unlabeled]), batch_sampler=sampler)


def steps(value, iterations):
    """A fraction of the iterations (< 1) or a number of iterations (>= 1)."""
    return round(value * iterations) if value < 1 else int(value)


@torch.no_grad()
def predict(model, dataset, device, amp, channels_last=False, batch=16):
    """Binary predictions and masks (N, H, W) of a dataset of (image, mask) pairs, in batches."""
    model.eval()
    preds, masks = [], []
    for images, mask in DataLoader(dataset, batch_size=batch):
        images = images.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        with amp.autocast():
            preds.append((model(images) > 0)[:, 0].cpu())
        masks.append(mask[:, 0] > 0.5)
    model.train()
    return torch.cat(preds).numpy(), torch.cat(masks).numpy()


def main(argv=None):
    args = parse_args(argv)
    with distributed_run(args.device) as context:
        return train(args, context)


def train(args, context):
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    main_process, gather, device = context.is_main, context.distributed, context.device
    out = Path(args.out)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    labeled, unlabeled, val, test = load_data(args)
    per_epoch = max(1, len(labeled) // args.labeled_batch)
    iterations = args.iterations or (args.epochs * per_epoch if args.epochs else 300)
    warmup = steps(args.warmup, iterations)
    cross_level = args.method == "cross_level"
    sampler, loader = make_loader(args, labeled, unlabeled, context)
    augment = None if args.no_augment else PairedAugment(p_flip=0.5, p_rot90=0.5)
    net = UNet(3, 1, base_width=args.width, depth=args.depth, proj_dim=32, norm=args.norm)
    net, model = prepare_model(net, context, channels_last=args.channels_last, compile_backend=args.compile,
                               sync_batchnorm=args.sync_bn)
    optimizer = make_optimizer(args, net.parameters())
    schedule = LRSchedule(optimizer, iterations, args.lr_schedule, warmup_steps=steps(args.lr_warmup, iterations))
    amp = MixedPrecision(args.amp, device)
    # Per-image negatives have nothing to gather: each image's cells only meet each other.
    contrast = CrossLevelContrast(temperature=args.temperature, negatives=args.negatives,
                                  gather_distributed=gather and args.negatives == "batch")
    consistency = CrossLevelConsistency()
    consistency_weight = args.consistency_weight * args.grid**2
    n = args.labeled_batch // context.world_size  # labeled images in this process's share of a batch

    code = code_version()  # of the process that finishes the run (a resumed run may have started on another)
    step, best, best_step, history, start, changes = 0, -1.0, 0, History(), time.time(), []
    if args.resume:  # check_resume let only --resume-anyway change the configuration; metrics.json says how
        changes = config_changes(checkpoint_state(args.resume), vars(args))
        step, best, best_step, history, start = resume_run(args.resume, net, optimizer, device, scheduler=schedule,
                                                           scaler=amp, carry_to=out if main_process else None)

    def checkpoint(path, carry=()):
        save_run(path, net, optimizer, step=step, best=best, best_step=best_step, history=history, started=start,
                 scheduler=schedule, scaler=amp, carry=carry, config=vars(args), config_changes=changes)

    bar = tqdm(total=iterations, initial=step, desc=f"{args.method}/{args.schedule}", dynamic_ncols=True,
               disable=not main_process)
    budget = TimeBudget(args.time_budget)
    while step < iterations and not budget.stopped:
        # One sampler epoch per evaluation period, so a checkpoint's step fixes the sampler position.
        sampler.set_epoch(step // args.eval_every)
        sums, done = {}, 0
        for i, (images, masks) in enumerate(loader):
            if i < step % args.eval_every:  # resuming mid-period: skip the batches already trained on
                continue
            torch.manual_seed(derived_seed(args.seed, step, context.rank))  # augmentation: a function of the step
            images, masks = images.to(device), masks.to(device)
            if augment is not None:
                images, masks = augment(images, masks)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with amp.autocast():
                if cross_level:
                    views = cross_level_views(model, images, args.grid, patch_batchnorm=args.patch_batchnorm)
                    losses = {"sup": bce_dice_loss(views.full_logits[:n], masks[:n], gather_distributed=gather)}
                    if args.schedule == "joint" or step < warmup:
                        losses["contrast"] = contrast(views.global_map, views.local_map)
                    if args.schedule == "joint" or step >= warmup:
                        losses["consistency"] = consistency(views.patch_logits, views.full_logits)
                else:
                    losses = {"sup": bce_dice_loss(model(images), masks, gather_distributed=gather)}
                weights = {"sup": 1.0, "contrast": args.contrast_weight, "consistency": consistency_weight}
                total = sum(weights[k] * v for k, v in losses.items())
            optimizer.zero_grad(set_to_none=True)
            amp.backward(total)
            amp.step(optimizer)
            lr = schedule.get_last_lr()[0]  # the rate of the step just taken
            schedule.step()
            step += 1
            for k, v in {**losses, "total": total}.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            done += 1
            bar.update()
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
            if step >= iterations or budget.expired():
                break
        # Rank 0 validates; every rank learns the score so that all keep the same best step.
        means = mean_over_ranks({k: v / done for k, v in sums.items()})
        if main_process:
            pred, true = predict(net, val, device, amp, args.channels_last)
            scores = {name: sum(fn(p, t) for p, t in zip(pred, true, strict=True)) / len(pred)
                      for name, fn in (("dice", dice), ("precision", precision), ("recall", recall))}
        scores = broadcast_object(scores if main_process else None)
        val_dice = scores["dice"]
        history.append(step=step, **{f"{k}/loss": v for k, v in means.items()}, lr=lr,
                       **{f"val/{k}": v for k, v in scores.items()})
        if val_dice > best:
            best, best_step = val_dice, step
            if main_process:
                checkpoint(out / "best.pt")
        if main_process:
            checkpoint(out / "last.pt", carry=[out / "best.pt"])  # a resume into another --out needs it
            bar.write(f"step {step}: val dice {val_dice:.4f} (best {best:.4f} at {best_step})")
        barrier()  # no rank runs ahead of the checkpoint it may have to resume from
    bar.close()
    if not main_process:
        return None

    load_checkpoint(out / "best.pt", net)
    pred, true = predict(net, test, device, amp, args.channels_last)
    summary = aggregate(binary_metrics(p, t) for p, t in zip(pred, true, strict=True))
    print(f"test, best checkpoint (step {best_step}, val dice {best:.4f}):\n{format_summary(summary)}")
    extra = {}
    for folder in args.test_data or []:
        dataset = SegmentationFolder(folder, size=args.image_size, mask_suffix=args.mask_suffix)
        p, t = predict(net, dataset, device, amp, args.channels_last)
        extra[folder] = aggregate(binary_metrics(a, b) for a, b in zip(p, t, strict=True))
        print(f"test on {folder} ({len(dataset)} images), best checkpoint:\n{format_summary(extra[folder])}")
    wall = time.time() - start
    result = {"config": vars(args), "config_changes": changes,
              "resumed_from_config": changes[-1]["resumed_from_config"] if changes else None,
              "code": code, "iterations": iterations, "iterations_done": step,
              "stopped_at_time_budget": budget.stopped, "best_step": best_step, "best_val_dice": best,
              "test": summary, "test_data": extra, "wall_time_s": wall, "threads": torch.get_num_threads(),
              "world_size": context.world_size}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    history.save(out / "history.json")
    shown = slice(0, 8)
    training_figure(history, test.tensors[0][shown], true[shown].astype(int), pred[shown].astype(int),
                    out / "results.png", class_names=["polyp"],
                    title=f"{args.method} ({args.schedule}), test dice {summary['dice']['mean']:.3f}")
    print(f"wrote {out / 'metrics.json'} and {out / 'results.png'} ({wall:.0f} s)")
    return result


if __name__ == "__main__":
    main()
