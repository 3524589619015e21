"""Contrastive pre-training of a U-Net with global and local contrast (Chaitanya et al., NeurIPS 2020).

    python examples/pretrain_global_local.py                   # synthetic hearts, a few minutes on a CPU
    python examples/pretrain_global_local.py --data ../shared/data/acdc --image-size 64 --batch 8
    python examples/pretrain_global_local.py --preset chaitanya2020-acdc --data ../shared/data/acdc   # GPU
    python examples/train_pseudo_label.py --method supervised --init runs/pretrain/pretrained.pt   # fine-tune

Stage 1 trains the encoder with ``GlobalContrast``: every batch holds ``--batch / --partitions``
volumes with one slice from each of their ``--partitions`` partitions along the slice axis
(``PartitionBatchSampler``), two augmented views of each slice; the slice embedding is the encoder's
last map, averaged over space, through a two-layer projection head. ``--strategy GR`` contrasts
each slice with every other, ``GD-`` leaves out the same partition of other volumes, ``GD`` makes
it a positive. Stage 2 freezes the encoder (BatchNorm statistics included) and trains the first
``--regions`` decoder blocks with ``LocalContrast`` on their output through a 1×1-convolution
head: two views that differ in intensity only, so region k of one view is region k of the other.
Labels are never read, except those of the validation volumes for the probes below.

Every ``--eval-every`` iterations (and before each stage) a k-NN probe on the validation volumes
shows what the features learned, leaving each volume out in turn: stage 1, the partition of each
slice from its 5 nearest slice embeddings of the other volumes (chance 1 / partitions); stage 2,
the majority class of each cell of an 8×8 grid from the decoder features (balanced accuracy, chance
0.25). The weights are the last ones (nothing is chosen on the probes). Outputs in ``--out``:
``pretrained_global.pt`` (encoder, at the end of stage 1), ``pretrained.pt`` (encoder and decoder
blocks: what ``train_pseudo_label.py --init`` loads), ``last.pt`` (resume), ``history.json``,
``metrics.json`` and ``curves.png``. One process (no torchrun).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from presets import (
    COUNT,
    POSITIVE,
    POSITIVE_INT,
    add_preset_argument,
    add_run_arguments,
    apply_preset,
    check_resume,
    flag,
    make_optimizer,
    ranged,
    save_pretrained,
)
from torch import nn
from tqdm import tqdm

from contrastkit import GlobalContrast, LocalContrast
from contrastkit.data import (
    ACDCSlices,
    ACDCVolumes,
    NiftiSlices,
    NiftiVolumes,
    PartitionBatchSampler,
    SyntheticCardiac,
    SyntheticCardiacVolumes,
    detect_layout,
    fit_size,
    nifti_slice_names,
)
from contrastkit.data.acdc import read_list
from contrastkit.models import UNet
from contrastkit.training import (
    History,
    LRSchedule,
    MixedPrecision,
    TimeBudget,
    checkpoint_state,
    code_version,
    config_changes,
    derived_seed,
    resume_run,
    save_run,
    seed_everything,
    world_size_from_env,
)

PROBE_GRID, PROBE_K = 8, 5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_preset_argument(p, "pretrain_global_local")
    p.add_argument("--data", default="synthetic", help="'synthetic', the ACDC HDF5 copy (../shared/data/acdc) or "
                   "official ACDC NIfTI (the folder holding training/): its training volumes, labels unread")
    p.add_argument("--strategy", choices=("GR", "GD-", "GD"), default="GD", help="global contrast's positives")
    p.add_argument("--partitions", type=POSITIVE_INT, default=4, help="partitions per volume, an int >= 1")
    p.add_argument("--batch", type=POSITIVE_INT, default=None, help="slices per batch, a multiple of --partitions "
                   "(default: 12, or 8 for GD, as the original)")
    p.add_argument("--iterations", type=COUNT, default=300, help="stage 1 (global) iterations, an int >= 0")
    p.add_argument("--local-iterations", type=COUNT, default=None,
                   help="stage 2 (local) iterations, an int >= 0 (default: --iterations; 0: encoder only)")
    p.add_argument("--regions", type=POSITIVE_INT, default=2,
                   help="stage 2 trains the first K decoder blocks (from the bottleneck), 1 <= K <= --depth")
    p.add_argument("--region-grid", type=POSITIVE_INT, default=4,
                   help="local contrast pools block K's output onto a G x G grid of regions")
    p.add_argument("--tau", type=POSITIVE, default=0.1, help="temperature of both losses, > 0")
    p.add_argument("--proj-dim", type=POSITIVE_INT, default=64, help="projection heads' output width")
    p.add_argument("--image-size", type=POSITIVE_INT, default=64,
                   help="slices are resized to this, a multiple of 2^depth")
    p.add_argument("--width", type=POSITIVE_INT, default=16, help="U-Net base width, an int >= 1")
    p.add_argument("--depth", type=POSITIVE_INT, default=3, help="U-Net poolings, an int >= 1")
    p.add_argument("--volumes", type=POSITIVE_INT, default=None,
                   help="pre-train on the first N training volumes (default: all)")
    p.add_argument("--synthetic-volumes", type=ranged(int, 2), default=20, help="synthetic training volumes")
    p.add_argument("--eval-every", type=POSITIVE_INT, default=50, help="probe and checkpoint every K iterations")
    p.add_argument("--val-volumes", type=ranged(int, 2), default=None,
                   help="probe on the first N validation volumes, an int >= 2")
    add_run_arguments(p, lr=1e-3, out="runs/pretrain")
    p.set_defaults(lr_schedule="constant")
    args = apply_preset(p, p.parse_args(argv), argv)
    if args.local_iterations is None:
        args.local_iterations = args.iterations
    if args.batch is None:
        args.batch = 8 if args.strategy == "GD" else 12
    check_args(p, args)
    check_resume(p, args)
    return args


def check_args(parser, args):
    if world_size_from_env() > 1 or args.sync_bn or args.compile:
        parser.error("this script runs on one process, without --sync-bn or --compile")
    if args.batch % args.partitions:
        parser.error(f"{flag(args, 'batch')} is not a multiple of {flag(args, 'partitions')}: a batch holds "
                     "one slice of each partition of --batch / --partitions volumes")
    if args.image_size % 2**args.depth:
        parser.error(f"{flag(args, 'image_size')} is not a multiple of 2^{args.depth}, which {flag(args, 'depth')} "
                     "requires")
    if args.regions > args.depth:
        parser.error(f"{flag(args, 'regions')} exceeds {flag(args, 'depth')}: the U-Net has {args.depth} "
                     "decoder blocks")
    side = args.image_size // 2 ** (args.depth - args.regions)
    if side % args.region_grid:
        parser.error(f"{flag(args, 'region_grid')} does not divide the {side}x{side} output of decoder block "
                     f"{args.regions} ({flag(args, 'image_size')}, {flag(args, 'depth')})")
    if args.iterations + args.local_iterations == 0:
        parser.error("--iterations and --local-iterations are both 0: nothing to train")


def load_data(args):
    """Training slices (N, 1, S, S) with their names, and the validation volumes."""
    if args.data == "synthetic":
        train = SyntheticCardiac(args.synthetic_volumes, 8, size=args.image_size, seed=0)
        val = SyntheticCardiacVolumes(4, 8, args.image_size, seed=2)  # as train_pseudo_label.py
    elif detect_layout(args.data) == "acdc-h5":
        train = ACDCSlices(args.data, read_list(args.data, "train_slices"), size=args.image_size)
        val = ACDCVolumes(args.data, "val")
    else:
        train = NiftiSlices(args.data, nifti_slice_names(args.data), size=args.image_size)
        val = NiftiVolumes(args.data, "val")
    names = list(train.names)
    if args.volumes is not None:  # the first N volumes in list order
        keep = list(dict.fromkeys(n.rsplit("_slice_", 1)[0] for n in names))[:args.volumes]
        names = [n for n in names if n.rsplit("_slice_", 1)[0] in set(keep)]
        train = type(train)(**_same_source(train, names))
    images = torch.stack([train[i][0] for i in range(len(names))])  # labels are never used
    return images, names, val[:args.val_volumes]


def _same_source(dataset, names):
    if isinstance(dataset, SyntheticCardiac):
        return dict(n_volumes=dataset.n_volumes, slices_per_volume=dataset.slices_per_volume, size=dataset.size,
                    seed=dataset.seed, names=names)
    return dict(root=dataset.root, names=names, size=dataset.size)


class Pretraining(nn.Module):
    """The U-Net and the two projection heads that only pre-training uses."""

    def __init__(self, args):
        super().__init__()
        self.net = UNet(1, 4, base_width=args.width, depth=args.depth, norm=args.norm)
        deep = args.width * 2**args.depth  # channels of the encoder's last map
        self.global_head = nn.Sequential(nn.Linear(deep, deep), nn.ReLU(inplace=True), nn.Linear(deep, args.proj_dim))
        block = args.width * 2 ** (args.depth - args.regions)  # channels of decoder block K's output
        self.local_head = nn.Sequential(nn.Conv2d(block, block, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(block, args.proj_dim, 1))
        self.regions = args.regions

    def encode(self, x):
        """The encoder's maps, shallowest first (the U-Net's skips and its bottleneck)."""
        skips = []
        for level, block in enumerate(self.net.down):
            x = block(x if level == 0 else self.net.pool(x))
            skips.append(x)
        return skips

    def slice_embedding(self, x):
        return self.encode(x)[-1].mean(dim=(2, 3))

    def decode(self, skips):
        """Output of decoder block ``regions`` (the first blocks, from the bottleneck)."""
        x = skips[-1]
        for k in range(self.regions):
            x = self.net.up[k](x, skips[-2 - k])
        return x

    def pretrained_tensors(self, decoder: bool):
        """The U-Net tensors pre-training trained: encoder, and the first ``regions`` decoder blocks."""
        prefixes = ("down.",) + (tuple(f"up.{k}." for k in range(self.regions)) if decoder else ())
        return {k: v for k, v in self.net.state_dict().items() if k.startswith(prefixes)}


def intensity(x):
    """Per slice: random contrast and brightness, a gamma in [0.7, 1.4], light noise; stays in 0..1."""
    b = x.shape[0]
    rand = lambda low, high: torch.empty(b, 1, 1, 1).uniform_(low, high)  # noqa: E731
    x = (x * rand(0.7, 1.3) + rand(-0.1, 0.1)).clamp(0, 1)
    x = x.clamp_min(1e-6) ** torch.exp(torch.empty(b, 1, 1, 1).uniform_(np.log(0.7), np.log(1.4)))
    return (x + 0.02 * torch.randn_like(x)).clamp(0, 1)


def geometry(x):
    """Per slice: a random quarter turn and flip (square slices)."""
    out = torch.empty_like(x)
    turns, flips = torch.randint(0, 4, (x.shape[0],)), torch.rand(x.shape[0]) < 0.5
    for i in range(x.shape[0]):
        y = torch.rot90(x[i], int(turns[i]), dims=(1, 2))
        out[i] = y.flip(2) if flips[i] else y
    return out


def global_views(x, augment):
    return torch.cat([intensity(geometry(x)), intensity(geometry(x))]) if augment else torch.cat([x, x])


def local_views(x, augment):
    if not augment:
        return x, x
    x = geometry(x)  # the same for both views: region k of one view is region k of the other
    return intensity(x), intensity(x)


# ----------------------------------------------------------------------------- probes


def _knn_predict(features, labels, groups, k=PROBE_K):
    """Leave-one-group-out k-NN (cosine, majority vote) prediction of ``labels`` from ``features``."""
    f = F.normalize(features.float(), dim=1)
    similarity = f @ f.T
    similarity[groups[:, None] == groups[None, :]] = float("-inf")  # never a neighbour of the same volume
    nearest = similarity.topk(min(k, int((groups != groups[0]).sum())), dim=1).indices
    votes = F.one_hot(labels[nearest], int(labels.max()) + 1).sum(1).float()
    votes += 1e-3 * F.one_hot(labels[nearest[:, 0]], votes.shape[1])  # ties go to the nearest
    return votes.argmax(1)


@torch.no_grad()
def probe(model, volumes, args, stage):
    """The k-NN probe of ``stage`` (1: partitions from slice embeddings, 2: cell classes from decoder
    features) on the validation volumes."""
    was = model.training
    model.eval()
    features, labels, groups = [], [], []
    for v, (_, image, label) in enumerate(volumes):
        x = fit_size(torch.from_numpy(image).float(), args.image_size)[:, None]
        if stage == 1:
            depth = x.shape[0]
            features.append(model.slice_embedding(x))
            labels.append(torch.div(torch.arange(depth) * args.partitions, depth, rounding_mode="floor"))
            groups.append(torch.full((depth,), v))
        else:
            f = F.adaptive_avg_pool2d(model.decode(model.encode(x)), PROBE_GRID)
            y = fit_size(torch.from_numpy(label), args.image_size)
            cells = F.one_hot(y, 4).permute(0, 3, 1, 2).float()
            majority = F.adaptive_avg_pool2d(cells, PROBE_GRID).argmax(1)
            features.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
            labels.append(majority.reshape(-1))
            groups.append(torch.full((majority.numel(),), v))
    model.train(was)
    labels, groups = torch.cat(labels), torch.cat(groups)
    predicted = _knn_predict(torch.cat(features), labels, groups)
    if stage == 1:
        return float((predicted == labels).float().mean())
    recalls = [float((predicted[labels == c] == c).float().mean()) for c in labels.unique()]
    return float(np.mean(recalls))  # balanced accuracy: background fills most cells


# ----------------------------------------------------------------------------- training


def main(argv=None):
    return train(parse_args(argv))


def train(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, names, val = load_data(args)
    sampler = PartitionBatchSampler(names, args.batch // args.partitions, args.partitions, seed=args.seed)
    model = Pretraining(args).to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(args, model.parameters())  # a frozen or unused part gets no gradient: no step
    stage1, total = args.iterations, args.iterations + args.local_iterations
    warmup = round(args.lr_warmup * total) if args.lr_warmup < 1 else int(args.lr_warmup)
    schedule = LRSchedule(optimizer, total, args.lr_schedule, warmup_steps=warmup)
    amp = MixedPrecision(args.amp, args.device)
    global_loss = GlobalContrast(strategy=args.strategy, temperature=args.tau)
    local_loss = LocalContrast(temperature=args.tau, region_grid=args.region_grid)
    views = torch.arange(2).repeat_interleave(args.batch).to(args.device)

    code = code_version()
    step, history, start, changes = 0, History(), time.time(), []
    if args.resume:
        changes = config_changes(checkpoint_state(args.resume), vars(args))
        step, _, _, history, start = resume_run(args.resume, model, optimizer, args.device, scheduler=schedule,
                                                scaler=amp)

    def evaluate(stage, **losses):
        record = {f"probe/{'partition' if stage == 1 else 'region'}_knn": probe(model, val, args, stage)}
        history.append(step=step, stage=stage, **losses, lr=schedule.get_last_lr()[0], **record)
        save_run(out / "last.pt", model, optimizer, step=step, best=0.0, best_step=0, history=history,
                 started=start, scheduler=schedule, scaler=amp, config=vars(args), config_changes=changes)
        return record

    def save(name, decoder):
        save_pretrained(out / name, model.pretrained_tensors(decoder),
                        unet={"in_channels": 1, "base_width": args.width, "depth": args.depth, "norm": args.norm},
                        parts={"encoder": stage1, "decoder_blocks": args.regions if decoder else 0,
                               "decoder_iterations": args.local_iterations if decoder else 0,
                               "strategy": args.strategy}, config=vars(args))

    bar = tqdm(total=total, initial=step, desc=f"global {args.strategy}", dynamic_ncols=True)
    budget, sums = TimeBudget(args.time_budget), []
    if step == 0 and stage1:
        bar.write(f"step 0: partition k-NN {evaluate(1)['probe/partition_knn']:.3f} (chance {1 / args.partitions:.3f})")
    while step < total and not budget.stopped:
        stage = 1 if step < stage1 else 2
        if stage == 2 and model.net.down[0][0].weight.requires_grad:  # entering stage 2, or resumed in it
            model.net.down.requires_grad_(False)
            bar.set_description(f"local, {args.regions} decoder block(s)")
            if step == stage1 and not (history.records and history.records[-1]["stage"] == 2):
                if stage1:
                    save("pretrained_global.pt", decoder=False)
                bar.write(f"step {step}: region k-NN {evaluate(2)['probe/region_knn']:.3f} before stage 2")
        model.train()
        if stage == 2:
            model.net.down.eval()  # frozen: BatchNorm keeps the statistics of stage 1
        sampler.set_epoch(step)
        index = next(iter(sampler))
        torch.manual_seed(derived_seed(args.seed, step, 0))  # augmentation: a function of the step
        x = images[index]
        with amp.autocast():
            if stage == 1:
                volumes, partitions = (t.to(args.device) for t in sampler.batch_ids(index))
                batch = global_views(x, not args.no_augment).to(args.device)
                z = model.global_head(model.slice_embedding(batch))
                loss = global_loss(z.float(), volumes.repeat(2), partitions.repeat(2), views)
            else:
                v1, v2 = (v.to(args.device) for v in local_views(x, not args.no_augment))
                with torch.no_grad():
                    skips = model.encode(torch.cat([v1, v2]))
                f = model.local_head(model.decode(skips)).float()
                loss = local_loss(*f.chunk(2))
        optimizer.zero_grad(set_to_none=True)
        amp.backward(loss)
        amp.step(optimizer)
        schedule.step()
        step += 1
        sums.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.eval_every == 0 or step in (stage1, total) or budget.expired():
            key = "global/loss" if stage == 1 else "local/loss"
            record = evaluate(stage, **{key: float(np.mean(sums))})
            sums = []
            bar.write(f"step {step}: {key} {history.records[-1][key]:.3f}, "
                      + ", ".join(f"{k} {v:.3f}" for k, v in record.items()))
    bar.close()
    if stage1 and step == stage1 and not args.local_iterations:
        save("pretrained_global.pt", decoder=False)
    save("pretrained.pt", decoder=step > stage1)
    wall = time.time() - start
    series = {key: history.series(key)[1] for key in ("probe/partition_knn", "probe/region_knn")}
    result = {"config": vars(args), "config_changes": changes, "code": code,
              "iterations": {"global": stage1, "local": args.local_iterations, "total": total},
              "iterations_done": step, "stopped_at_time_budget": budget.stopped,
              "training_slices": len(names), "training_volumes": len(sampler.volumes),
              "volumes_left_out": sampler.skipped, "val_volumes": len(val),
              "probes": {k: {"first": v[0], "last": v[-1]} for k, v in series.items() if v},
              "chance": {"probe/partition_knn": 1 / args.partitions, "probe/region_knn": 0.25},
              "pretrained": str(out / "pretrained.pt"), "wall_time_s": wall, "threads": torch.get_num_threads()}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    history.save(out / "history.json")
    curves(history, out / "curves.png", args)
    print(f"wrote {out / 'pretrained.pt'}, {out / 'metrics.json'} and {out / 'curves.png'} ({wall:.0f} s)")
    return result


def curves(history, path, args):
    """Losses of both stages, and the k-NN probes against chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    for key in ("global/loss", "local/loss"):
        steps, values = history.series(key)
        if steps:
            axes[0].plot(steps, values, "o-", ms=3, label=key)
    axes[0].set(xlabel="iteration", ylabel="contrastive loss", title=f"losses (global {args.strategy}, local)")
    for key, chance in (("probe/partition_knn", 1 / args.partitions), ("probe/region_knn", 0.25)):
        steps, values = history.series(key)
        if steps:
            line, = axes[1].plot(steps, values, "o-", ms=3, label=key.split("/")[1])
            axes[1].axhline(chance, color=line.get_color(), ls=":", lw=1)
    axes[1].set(xlabel="iteration", ylabel="k-NN accuracy on validation", title="probes (dotted: chance)")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
