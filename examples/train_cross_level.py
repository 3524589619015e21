"""Semi-supervised polyp segmentation with cross-level contrast and consistency (Zhao et al., ISBI 2022).

    python examples/train_cross_level.py                       # synthetic polyps, a few minutes on a CPU
    python examples/train_cross_level.py --data ../shared/data/kvasir-seg --image-size 128 --grid 4

Each batch holds labeled and unlabeled images. The supervised loss (BCE + soft Dice) uses the
labeled ones; the cross-level terms use all of them. ``--schedule sequential`` is the original:
supervised + contrast during the warm-up, then supervised + consistency; ``joint`` uses all
three terms all along. ``--method supervised`` trains on the labeled images alone (the baseline).
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset
from tqdm import tqdm

from contrastkit import CrossLevelConsistency, CrossLevelContrast, cross_level_views
from contrastkit.data import PairedAugment, SegmentationFolder, SyntheticPolyps, TwoStreamBatchSampler, make_split
from contrastkit.metrics import aggregate, binary_metrics, dice, format_summary, precision, recall
from contrastkit.models import UNet
from contrastkit.segmentation import bce_dice_loss
from contrastkit.training import History, load_checkpoint, resume_run, save_run, seed_everything
from contrastkit.viz import training_figure


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="synthetic", help="'synthetic' or a folder with images/ and masks/")
    p.add_argument("--synthetic-size", type=int, default=400, help="number of synthetic images")
    p.add_argument("--labeled-fraction", type=float, default=0.1, help="labeled share of the training images")
    p.add_argument("--method", choices=("supervised", "cross_level"), default="cross_level")
    p.add_argument("--schedule", choices=("sequential", "joint"), default="sequential")
    p.add_argument("--warmup", type=float, default=0.3,
                   help="sequential: contrast phase length, a fraction of the iterations (< 1) or iterations (>= 1)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--grid", type=int, default=2, help="patches per side; image-size/grid must divide by 2^depth")
    p.add_argument("--width", type=int, default=16, help="U-Net base width")
    p.add_argument("--depth", type=int, default=3, help="U-Net poolings")
    p.add_argument("--iterations", type=int, default=None, help="optimizer steps (default 300)")
    p.add_argument("--epochs", type=int, default=None, help="alternative to --iterations: passes over the labeled set")
    p.add_argument("--eval-every", type=int, default=50, help="validate and checkpoint every K iterations")
    p.add_argument("--batch", type=int, default=8, help="images per batch")
    p.add_argument("--labeled-batch", type=int, default=4, help="labeled images per batch")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--contrast-weight", type=float, default=0.1)
    p.add_argument("--consistency-weight", type=float, default=1.0,
                   help="times gh*gw: the original sums the per-patch mean over the cells")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--patch-batchnorm", choices=("batch", "batch_no_update", "running"), default="batch",
                   help="BatchNorm in the patch pass: its own statistics (also entering the running ones), its "
                        "own without updating the running ones, or the full images' running statistics")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, sampler and augmentation")
    p.add_argument("--split-seed", type=int, default=0, help="seeds the train/val/test split")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="runs/cross_level")
    p.add_argument("--resume", default=None, help="a last.pt checkpoint to continue from")
    return p.parse_args(argv)


def load_data(args):
    """Train-labeled, train-unlabeled, val and test sets, held in memory as tensors."""
    if args.data == "synthetic":
        source = SyntheticPolyps(args.synthetic_size, size=args.image_size, seed=1234)
        ids = [str(i) for i in range(len(source))]
        load = lambda part: [source[int(i)] for i in part]  # noqa: E731
    else:
        ids = SegmentationFolder(args.data).ids
        def load(part):
            folder = SegmentationFolder(args.data, size=args.image_size, ids=part)
            return [folder[i] for i in range(len(folder))]
    split = make_split(ids, seed=args.split_seed, val=0.1, test=0.1, labeled=args.labeled_fraction)
    parts = (split.train_labeled, split.train_unlabeled, split.val, split.test)
    return [TensorDataset(*(torch.stack(t) for t in zip(*load(part), strict=True))) for part in parts]


def make_loader(args, labeled, unlabeled):
    """Batches of ``--labeled-batch`` labeled images then unlabeled ones; one sampler epoch per evaluation."""
    # The baseline sees the same labeled images per step and nothing else.
    unlabeled_batch = args.batch - args.labeled_batch if args.method == "cross_level" else 0
    sampler = TwoStreamBatchSampler.for_concat(len(labeled), len(unlabeled), args.labeled_batch, unlabeled_batch,
                                               num_batches=args.eval_every, seed=args.seed)
    return sampler, DataLoader(ConcatDataset([labeled, unlabeled]), batch_sampler=sampler)


@torch.no_grad()
def predict(model, dataset, device, batch=16):
    model.eval()
    images, masks = dataset.tensors
    logits = torch.cat([model(images[i:i + batch].to(device)).cpu() for i in range(0, len(images), batch)])
    model.train()
    return (logits > 0)[:, 0].numpy(), masks[:, 0].numpy().astype(bool)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labeled, unlabeled, val, test = load_data(args)
    per_epoch = max(1, len(labeled) // args.labeled_batch)
    iterations = args.iterations or (args.epochs * per_epoch if args.epochs else 300)
    warmup = int(args.warmup * iterations) if args.warmup < 1 else int(args.warmup)
    cross_level = args.method == "cross_level"
    sampler, loader = make_loader(args, labeled, unlabeled)
    augment = PairedAugment(p_flip=0.5, p_rot90=0.5)
    model = UNet(3, 1, base_width=args.width, depth=args.depth, proj_dim=32).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    contrast, consistency = CrossLevelContrast(temperature=args.temperature), CrossLevelConsistency()
    consistency_weight = args.consistency_weight * args.grid**2

    step, best, best_step, history, start = 0, -1.0, 0, History(), time.time()
    if args.resume:
        step, best, best_step, history, start = resume_run(args.resume, model, optimizer, args.device)

    def checkpoint(path):
        save_run(path, model, optimizer, step=step, best=best, best_step=best_step, history=history, started=start,
                 config=vars(args))

    bar = tqdm(total=iterations, initial=step, desc=f"{args.method}/{args.schedule}", dynamic_ncols=True)
    while step < iterations:
        # One sampler epoch per evaluation period, so a checkpoint's step fixes the sampler position.
        sampler.set_epoch(step // args.eval_every)
        sums, done = {}, 0
        for i, (images, masks) in enumerate(loader):
            if i < step % args.eval_every:  # resuming mid-period: skip the batches already trained on
                continue
            images, masks = augment(images.to(args.device), masks.to(args.device))
            n = args.labeled_batch
            if cross_level:
                views = cross_level_views(model, images, args.grid, patch_batchnorm=args.patch_batchnorm)
                losses = {"sup": bce_dice_loss(views.full_logits[:n], masks[:n])}
                if args.schedule == "joint" or step < warmup:
                    losses["contrast"] = contrast(views.global_map, views.local_map)
                if args.schedule == "joint" or step >= warmup:
                    losses["consistency"] = consistency(views.patch_logits, views.full_logits)
            else:
                losses = {"sup": bce_dice_loss(model(images), masks)}
            weights = {"sup": 1.0, "contrast": args.contrast_weight, "consistency": consistency_weight}
            total = sum(weights[k] * v for k, v in losses.items())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            step += 1
            for k, v in {**losses, "total": total}.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            done += 1
            bar.update()
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
            if step >= iterations:
                break
        pred, true = predict(model, val, args.device)
        scores = {name: sum(fn(p, t) for p, t in zip(pred, true, strict=True)) / len(pred)
                  for name, fn in (("dice", dice), ("precision", precision), ("recall", recall))}
        val_dice = scores["dice"]
        history.append(step=step, **{f"{k}/loss": v / done for k, v in sums.items()},
                       **{f"val/{k}": v for k, v in scores.items()})
        if val_dice > best:
            best, best_step = val_dice, step
            checkpoint(out / "best.pt")
        checkpoint(out / "last.pt")
        bar.write(f"step {step}: val dice {val_dice:.4f} (best {best:.4f} at {best_step})")
    bar.close()

    load_checkpoint(out / "best.pt", model)
    pred, true = predict(model, test, args.device)
    summary = aggregate(binary_metrics(p, t) for p, t in zip(pred, true, strict=True))
    print(f"test, best checkpoint (step {best_step}, val dice {best:.4f}):\n{format_summary(summary)}")
    wall = time.time() - start
    result = {"config": vars(args), "iterations": iterations, "best_step": best_step, "best_val_dice": best,
              "test": summary, "wall_time_s": wall, "threads": torch.get_num_threads()}
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
