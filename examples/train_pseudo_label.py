"""Semi-supervised cardiac segmentation with pseudo-label contrast (Chaitanya et al., MedIA 2023).

    python examples/train_pseudo_label.py                      # synthetic hearts, a few minutes on a CPU
    python examples/train_pseudo_label.py --data ../shared/data/acdc --image-size 128 --labeled-patients 3
    python examples/train_pseudo_label.py --data DIR   # official ACDC NIfTI (DIR/training/) or MSD Task05_Prostate
    torchrun --nproc_per_node=2 examples/train_pseudo_label.py --preset ssl4mis-acdc --data ../shared/data/acdc

Stage 1 trains a U-Net on the labeled patients with Dice + cross-entropy. Stage 2 adds
λ · PseudoLabelContrast on the projection head, with ground truth on the labeled slices and
pseudo-labels on the unlabeled ones; the pseudo-labels come from the best model so far (by
validation Dice) and are refreshed every ``--refresh-every`` iterations, ``--rounds`` times.
``--method supervised`` is the baseline: stage 1 only, for the iterations of both stages. Stage 1
is the same for every method, so ``--stage1-from DIR`` starts stage 2 from the end of stage 1 of
the run in ``DIR`` (every run writes ``stage1.pt``): a study trains stage 1 once per seed.
Test metrics are 3D Dice and HD95 per class at each volume's own size; HD95 is in mm for NIfTI
volumes (spacing from the headers) and in voxels otherwise (the ACDC HDF5 files carry no spacing).
``--init CKPT`` starts from the weights ``examples/pretrain_global_local.py`` wrote (its
``pretrained.pt``): exactly the tensors the file holds, the encoder and the pre-trained decoder
blocks with their BatchNorm statistics, are copied into the U-Net; the other decoder blocks, the
segmentation head and the projection head keep their random initialisation. A file pre-trained
with another ``--width``, ``--depth`` or ``--norm`` stops the script before training, naming the
tensors that differ. ``--method supervised --init CKPT`` is Chaitanya et al.'s "pre-trained +
fine-tuned" arm, ``--method pseudo_label --init CKPT`` their combination with this script's stage 2.
Under torchrun every process takes an equal share of each batch (``--batch`` and
``--labeled-batch`` count the whole step); rank 0 validates, prints and writes the files.
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
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
    load_pretrained,
    make_optimizer,
    ranged,
)
from tqdm import tqdm

from contrastkit import PseudoLabelContrast, pseudo_labels
from contrastkit.data import (
    ACDCSlices,
    ACDCVolumes,
    NiftiSlices,
    NiftiVolumes,
    PairedAugment,
    SyntheticCardiac,
    SyntheticCardiacVolumes,
    TwoStreamBatchSampler,
    acdc_patient_split,
    detect_layout,
    fit_size,
    nifti_patient_split,
    predict_volume,
    split_by_patient,
)
from contrastkit.metrics import aggregate, dice, format_summary, per_class_metrics
from contrastkit.models import UNet
from contrastkit.segmentation import dice_ce_loss
from contrastkit.training import (
    RESUME_MAY_CHANGE,
    History,
    LRSchedule,
    MixedPrecision,
    TimeBudget,
    barrier,
    broadcast_object,
    checkpoint_state,
    code_version,
    compare_configs,
    config_changes,
    derived_seed,
    distributed_run,
    load_checkpoint,
    mean_over_ranks,
    prepare_model,
    resume_run,
    save_checkpoint,
    save_run,
    seed_everything,
    world_size_from_env,
)
from contrastkit.viz import training_figure

CLASSES = ("RV", "Myo", "LV")  # label ids 1, 2, 3; 0 is background
PROSTATE_CLASSES = ("PZ", "TZ")  # MSD Task05: 1 peripheral zone, 2 transition zone
IGNORE = -1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_preset_argument(p, "train_pseudo_label")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a data folder: the ACDC HDF5 copy (e.g. "
                   "../shared/data/acdc), official ACDC NIfTI (the folder holding training/) or MSD Task05_Prostate "
                   "(imagesTr/, labelsTr/; T2 only)")
    p.add_argument("--method", choices=("supervised", "pseudo_label"), default="pseudo_label")
    p.add_argument("--mode", choices=("prototype", "pixel"), default="prototype")
    p.add_argument("--labeled-patients", type=POSITIVE_INT, default=3,
                   help="labeled patients (synthetic: volumes), an int >= 1; the other patients are unlabeled")
    p.add_argument("--image-size", type=POSITIVE_INT, default=64,
                   help="training slices are resized to this, a multiple of 2^depth")
    p.add_argument("--width", type=POSITIVE_INT, default=16, help="U-Net base width, an int >= 1")
    p.add_argument("--depth", type=COUNT, default=3, help="U-Net poolings, an int >= 0")
    p.add_argument("--iterations", type=POSITIVE_INT, default=300, help="iterations per stage, an int >= 1")
    p.add_argument("--rounds", type=POSITIVE_INT, default=3, help="stage 2: pseudo-label rounds, an int >= 1")
    p.add_argument("--refresh-every", type=POSITIVE_INT, default=None, help="stage 2: iterations per round, an int "
                   ">= 1 (default iterations // rounds); stage 2 lasts rounds * refresh-every iterations")
    p.add_argument("--eval-every", type=POSITIVE_INT, default=50,
                   help="validate and checkpoint every K iterations, an int >= 1")
    p.add_argument("--batch", type=POSITIVE_INT, default=8, help="slices per stage-2 batch, >= --labeled-batch")
    p.add_argument("--labeled-batch", type=POSITIVE_INT, default=4,
                   help="labeled slices per batch (all of a stage-1 batch), an int >= 1")
    p.add_argument("--lam", type=NON_NEGATIVE, default=0.1, help="weight λ of the contrastive term, >= 0")
    p.add_argument("--tau", type=POSITIVE, default=0.1, help="contrastive temperature, > 0")
    p.add_argument("--confidence-threshold", type=ranged(float, 0, 1), default=0.9,
                   help="pseudo-labels below this softmax confidence are ignored; in [0, 1]")
    p.add_argument("--anchors-per-class", type=POSITIVE_INT, default=None,
                   help="sample anchors, an int >= 1 (default: all pixels)")
    p.add_argument("--synthetic-volumes", type=ranged(int, 2), default=20,
                   help="synthetic training volumes, more than --labeled-patients")
    p.add_argument("--stage1-from", default=None, metavar="DIR",
                   help="start stage 2 from the end of stage 1 of the run in DIR (its stage1.pt and stage1_best.pt, "
                   "written by every run): stage 1 is the same for every --method, so the arms of a study train it "
                   "once; DIR's settings must equal these but for the stage-2 ones")
    p.add_argument("--val-volumes", type=POSITIVE_INT, default=None,
                   help="use only the first N validation volumes, an int >= 1")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from pre-trained weights: a pretrained.pt of pretrain_global_local.py (the encoder and "
                   "the decoder blocks it holds are loaded; the rest stays random)")
    p.add_argument("--test-volumes", type=POSITIVE_INT, default=None,
                   help="use only the first N test volumes, an int >= 1")
    add_run_arguments(p, lr=2e-3, out="runs/pseudo_label")
    args = apply_preset(p, p.parse_args(argv), argv)
    check_args(p, args, world_size_from_env())
    args.classes = class_names(args.data)
    check_resume(p, args)
    if args.init is not None:  # a file that cannot load stops here, before the data are read
        try:
            load_pretrained(make_unet(args), args.init)
        except (OSError, ValueError) as err:
            p.error(f"--init {args.init}: {err}" if isinstance(err, OSError) else str(err))
    return args


def make_unet(args):
    return UNet(1, len(args.classes) + 1, base_width=args.width, depth=args.depth, proj_dim=32, norm=args.norm)


def class_names(data):
    """Foreground class names (label ids 1, 2, ...) of ``--data``; an unknown folder fails here, before training."""
    return PROSTATE_CLASSES if data != "synthetic" and detect_layout(data) == "msd-prostate" else CLASSES


def check_args(parser, args, world):
    """Flag combinations that cannot train, reported before anything is loaded."""
    if args.data == "synthetic" and args.labeled_patients >= args.synthetic_volumes:
        parser.error(f"{flag(args, 'labeled_patients')} leaves no unlabeled volume of {flag(args, 'synthetic_volumes')}"
                     ": give fewer labeled patients or more volumes")
    if args.image_size % 2**args.depth:
        parser.error(f"{flag(args, 'image_size')} is not a multiple of 2^{args.depth} = {2**args.depth}, "
                     f"which {flag(args, 'depth')} requires")
    unlabeled = args.batch - args.labeled_batch if args.method == "pseudo_label" else 0
    if args.labeled_batch < 1 or unlabeled < 0:
        parser.error(f"need 1 <= {flag(args, 'labeled_batch')} <= {flag(args, 'batch')}")
    if world > args.labeled_batch:
        parser.error(f"{world} processes but {flag(args, 'labeled_batch')}: every process needs at least "
                     "one labeled slice per batch (raise --labeled-batch or lower torchrun's --nproc_per_node)")
    for dest, count in (("labeled_batch", args.labeled_batch), ("batch", unlabeled)):
        if count % world:
            what = flag(args, dest) if dest == "labeled_batch" else f"the {unlabeled} unlabeled slices per batch"
            parser.error(f"{what} cannot be split evenly over {world} processes")
    if args.stage1_from is not None and (args.method != "pseudo_label" or args.resume):
        parser.error("--stage1-from starts a pseudo-label run's stage 2; it takes neither --method supervised "
                     "nor --resume (a run cut short resumes from its own last.pt)")
    if args.sync_bn and (args.norm != "batch" or (world > 1 and not args.device.startswith("cuda"))):
        parser.error("--sync-bn needs --norm batch and, under torchrun, CUDA devices")


def load_data(args):
    """Labeled and unlabeled training slices as tensors, and the validation and test volumes."""
    if args.data == "synthetic":
        full = SyntheticCardiac(args.synthetic_volumes, 8, size=args.image_size, seed=0)
        labeled, unlabeled = split_by_patient(full.names, args.labeled_patients, seed=args.seed)
        make = lambda names: SyntheticCardiac(args.synthetic_volumes, 8, args.image_size, 0, names)  # noqa: E731
        val, test = SyntheticCardiacVolumes(4, 8, args.image_size, seed=2), SyntheticCardiacVolumes(8, 8, 96, seed=1)
    elif detect_layout(args.data) == "acdc-h5":  # SSL4MIS' labeled patients (seed=None), to compare with papers
        labeled, unlabeled = acdc_patient_split(args.data, args.labeled_patients, seed=None)
        make = lambda names: ACDCSlices(args.data, names, size=args.image_size)  # noqa: E731
        val, test = ACDCVolumes(args.data, "val"), ACDCVolumes(args.data, "test")
    else:  # NIfTI: nifti_split's patient split (70/10/20 for ACDC), labeled patients drawn with --seed
        labeled, unlabeled = nifti_patient_split(args.data, args.labeled_patients, seed=args.seed)
        make = lambda names: NiftiSlices(args.data, names, size=args.image_size)  # noqa: E731
        val, test = NiftiVolumes(args.data, "val"), NiftiVolumes(args.data, "test")
    stacks = []
    for names in (labeled, unlabeled):
        images, labels = zip(*(item for item in make(names)), strict=True)
        stacks.append((torch.stack(images), torch.stack(labels)))
    return stacks[0], stacks[1][0], val[:args.val_volumes], test[:args.test_volumes]


@torch.no_grad()
def refresh_pseudo_labels(model, images, threshold=None, batch=32, device="cpu"):
    """Hard pseudo-labels and confidences (N, H, W) for ``images`` (N, 1, H, W) from ``model``.

    Pixels whose softmax confidence is below ``threshold`` get ``IGNORE``."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(images[i:i + batch].to(device)).float().cpu() for i in range(0, len(images), batch)])
    model.train(was_training)
    return pseudo_labels(logits, threshold=threshold, ignore_index=IGNORE)


def training_batch(images, masks, sampler, step, augment, device):
    """Batch ``step``: images, labels (ground truth, pseudo-label or IGNORE) and confidences."""
    sampler.set_epoch(step)  # one batch per sampler epoch: the step alone fixes the batch (resume)
    index = next(iter(sampler))
    x, m = images[index].to(device), masks[index].to(device)
    if augment is not None:
        x, m = augment(x, m)
    return x, m[:, 0].round().long(), m[:, 1]


def segment(model, volumes, args):
    model.eval()
    with torch.no_grad():
        preds = [predict_volume(model, image, args.image_size, device=args.device) for _, image, _ in volumes]
    model.train()
    return preds


def validate(model, volumes, args):
    """Mean over volumes and classes of the 3D Dice (no HD95: it is only for model selection)."""
    preds = segment(model, volumes, args)
    return float(np.mean([dice(p == c, v[2] == c) for p, v in zip(preds, volumes, strict=True)
                          for c in range(1, len(args.classes) + 1)]))


def hd95_unit(volumes):
    """"mm" when the volumes carry their voxel spacing (NIfTI), else "voxel"."""
    return "mm" if getattr(volumes, "spacings", None) else "voxel"


# Settings stage 1 does not read: a run may start from another's stage 1 when all the others agree,
# as may the settings a resume may change (where and how a run executes).
STAGE2_ONLY = RESUME_MAY_CHANGE | {"method", "mode", "lam", "tau", "confidence_threshold", "anchors_per_class"}


def stage1_state(folder, args, stage1):
    """The paths of ``folder``'s end-of-stage-1 checkpoints after checking that its run had the
    settings of ``args`` (but for :data:`STAGE2_ONLY`) and stopped stage 1 at step ``stage1``."""
    folder = Path(folder)
    last, best = folder / "stage1.pt", folder / "stage1_best.pt"
    for path in (last, best):
        if not path.is_file():
            raise FileNotFoundError(f"--stage1-from {folder}: no {path.name} (a run writes it when its stage 1 ends)")
    state = torch.load(last, map_location="cpu", weights_only=False)["state"]
    differ = compare_configs(state.get("config", {}), vars(args), ignore=STAGE2_ONLY)
    if differ:
        raise ValueError(f"--stage1-from {folder}: its run was trained with other settings: "
                         + ", ".join(f"{k}={theirs!r} (here {ours!r})" for k, (theirs, ours) in differ.items()))
    if state["step"] != stage1:
        raise ValueError(f"--stage1-from {folder}: stage1.pt is at step {state['step']}, stage 1 ends at {stage1}")
    return last, best


def test_metrics(model, volumes, args):
    """Per-volume Dice and HD95 (in ``hd95_unit(volumes)``) per class and their mean, and the aggregate."""
    per_volume = []
    spacings = getattr(volumes, "spacings", None) or [None] * len(volumes)
    for (name, _, label), pred, spacing in zip(volumes, segment(model, volumes, args), spacings, strict=True):
        scores = per_class_metrics(pred, label, len(args.classes) + 1, spacing=spacing)
        row = {args.classes[c - 1]: {"dice": s["dice"], "hd95": s["hd95"]} for c, s in scores.items()}
        row["mean"] = {k: float(np.mean([row[c][k] for c in args.classes])) for k in ("dice", "hd95")}
        per_volume.append({"name": name, **row})
    return aggregate([{k: v for k, v in r.items() if k != "name"} for r in per_volume]), per_volume


def main(argv=None):
    args = parse_args(argv)
    with distributed_run(args.device) as context:
        return train(args, context)


def train(args, context):
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    main_process, gather, world = context.is_main, context.distributed, context.world_size
    out = Path(args.out)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    (lab_images, lab_labels), unl_images, val, test = load_data(args)
    n_lab, n_unl = len(lab_images), len(unl_images)
    stage1 = args.iterations
    refresh_every = args.refresh_every or max(1, args.iterations // args.rounds)
    stage2 = args.rounds * refresh_every
    total = stage1 + stage2  # the supervised baseline runs stage 1 for all of them
    contrastive = args.method == "pseudo_label"

    # Every slice carries (label, confidence) as a 2-channel "mask", so augmentation moves both:
    # ground truth with confidence 1, unlabeled slices get theirs at each refresh.
    images = torch.cat([lab_images, unl_images])
    masks = torch.zeros(n_lab + n_unl, 2, *images.shape[-2:])
    masks[:n_lab, 0], masks[:n_lab, 1] = lab_labels.float(), 1.0
    masks[n_lab:, 0] = IGNORE
    n = args.labeled_batch // world  # labeled slices in this process's share of a batch
    samplers = [TwoStreamBatchSampler.for_concat(n_lab, n_unl, n, unlabeled // world, num_batches=1, seed=args.seed,
                                                 rank=context.rank, world_size=world)
                for unlabeled in (0, args.batch - args.labeled_batch)]
    augment = None if args.no_augment else PairedAugment(p_flip=0.5, p_rot90=0.5)
    net = make_unet(args)
    if args.init is not None and not (args.resume or args.stage1_from):  # those bring their own weights
        loaded = load_pretrained(net, args.init)
        if main_process:
            print(f"--init {args.init}: loaded {len(loaded)} pre-trained tensors (encoder and decoder blocks "
                  f"{sorted({k.split('.')[1] for k in loaded if k.startswith('up.')})})")
    net, model = prepare_model(net, context, channels_last=args.channels_last, compile_backend=args.compile,
                               sync_batchnorm=args.sync_bn)
    teacher = make_unet(args).to(context.device)
    optimizer = make_optimizer(args, net.parameters())
    warmup = round(args.lr_warmup * total) if args.lr_warmup < 1 else int(args.lr_warmup)
    schedule = LRSchedule(optimizer, total, args.lr_schedule, warmup_steps=warmup)
    amp = MixedPrecision(args.amp, context.device)
    # Pixel mode under torchrun: the usable pixels of every process are keys. Prototype mode contrasts
    # within an image pair: nothing to gather.
    contrast = PseudoLabelContrast(temperature=args.tau, mode=args.mode, anchors_per_class=args.anchors_per_class,
                                   confidence_threshold=args.confidence_threshold, num_classes=len(args.classes) + 1,
                                   gather_distributed=gather and args.mode == "pixel")

    code = code_version()  # of the process that finishes the run (a resumed run may have started on another)
    step, best, best_step, history, start, refreshed = 0, -1.0, 0, History(), time.time(), None
    changes = []  # check_resume let only --resume-anyway change the configuration; metrics.json says how
    if args.resume or args.stage1_from:
        resume_from = args.resume
        if args.stage1_from:
            resume_from, stage1_best = stage1_state(args.stage1_from, args, stage1)
            if main_process:  # the first round's teacher, and the best model if stage 2 never beats it
                shutil.copyfile(stage1_best, out / "best.pt")
        else:
            changes = config_changes(checkpoint_state(resume_from), vars(args))
        step, best, best_step, history, start = resume_run(resume_from, net, optimizer, context.device,
                                                           scheduler=schedule, scaler=amp,
                                                           carry_to=out if main_process else None)

    def checkpoint(path, carry=()):
        save_run(path, net, optimizer, step=step, best=best, best_step=best_step, history=history, started=start,
                 scheduler=schedule, scaler=amp, carry=carry, config=vars(args), config_changes=changes)

    bar = tqdm(total=total, initial=step, desc=args.method + (f"/{args.mode}" if contrastive else ""),
               dynamic_ncols=True, disable=not main_process)
    sums = {}
    budget = TimeBudget(args.time_budget)
    while step < total and not budget.stopped:
        in_stage2 = contrastive and step >= stage1
        round_start = stage1 + (step - stage1) // refresh_every * refresh_every
        if in_stage2 and refreshed != round_start:
            teacher_path = out / f"teacher_{round_start}.pt"
            # A new round, or a resume whose --resume-anyway moved the rounds: the teacher is the best model so far.
            if main_process and (step == round_start or not teacher_path.is_file()):
                load_checkpoint(out / "best.pt", teacher)
                save_checkpoint(teacher_path, teacher)
            barrier()
            load_checkpoint(teacher_path, teacher)  # resumed mid-round: the same teacher as before the interruption
            labels, confidence = refresh_pseudo_labels(teacher, unl_images, args.confidence_threshold,
                                                       device=context.device)
            masks[n_lab:, 0], masks[n_lab:, 1] = labels.float(), confidence
            refreshed = round_start
            kept = (labels != IGNORE).float().mean().item()
            if main_process:
                bar.write(f"step {step}: pseudo-labels from the model of step {best_step} ({kept:.1%} of pixels kept)")
        torch.manual_seed(derived_seed(args.seed, step, context.rank))  # augmentation: a function of the step
        x, y, conf = training_batch(images, masks, samplers[in_stage2], step, augment, context.device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp.autocast():
            output = model(x, return_features=True)
            losses = {"seg": dice_ce_loss(output.logits[:n], y[:n], gather_distributed=gather)}
            if in_stage2:
                losses["contrast"] = contrast(output.projection, y, conf)
            total_loss = losses["seg"] + args.lam * losses.get("contrast", 0.0)
        optimizer.zero_grad(set_to_none=True)
        amp.backward(total_loss)
        amp.step(optimizer)
        lr = schedule.get_last_lr()[0]  # the rate of the step just taken
        schedule.step()
        step += 1
        for k, v in {**losses, "total": total_loss}.items():
            sums.setdefault(k, []).append(v.item())
        bar.update()
        bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
        if step % args.eval_every == 0 or step == total or step == stage1 or budget.expired():
            # Rank 0 validates; every rank learns the score so that all keep the same best step.
            means = mean_over_ranks({k: float(np.mean(v)) for k, v in sums.items()})
            val_dice = broadcast_object(validate(net, val, args) if main_process else None)
            history.append(step=step, **{f"{k}/loss": v for k, v in means.items()}, lr=lr, **{"val/dice": val_dice})
            sums = {}
            if val_dice > best:
                best, best_step = val_dice, step
                if main_process:
                    checkpoint(out / "best.pt")
            if main_process:
                # What a resume into another --out needs: the best model and this round's teacher.
                teacher_file = [out / f"teacher_{refreshed}.pt"] if in_stage2 else []
                checkpoint(out / "last.pt", carry=[out / "best.pt", *teacher_file])
                if step == stage1:  # what another method's run may start its stage 2 from (--stage1-from)
                    shutil.copyfile(out / "best.pt", out / "stage1_best.tmp")
                    os.replace(out / "stage1_best.tmp", out / "stage1_best.pt")
                    checkpoint(out / "stage1.pt")  # last: a waiting run starts when this one appears
                bar.write(f"step {step}: val dice {val_dice:.4f} (best {best:.4f} at {best_step})")
            barrier()  # the next round's teacher and a resume read what rank 0 wrote
    bar.close()
    if not main_process:
        return None

    load_checkpoint(out / "best.pt", net)
    summary, per_volume = test_metrics(net, test, args)
    print(f"test ({len(test)} volumes), best checkpoint (step {best_step}, val dice {best:.4f}):\n"
          f"{format_summary(summary)}")
    wall = time.time() - start
    result = {"config": vars(args), "config_changes": changes,
              "resumed_from_config": changes[-1]["resumed_from_config"] if changes else None,
              "code": code, "stage1_from": args.stage1_from,
              "iterations": {"stage1": stage1, "stage2": stage2, "total": total},
              "iterations_done": step, "stopped_at_time_budget": budget.stopped,
              "labeled_slices": n_lab, "unlabeled_slices": n_unl, "best_step": best_step, "best_val_dice": best,
              "hd95_unit": hd95_unit(test), "test": summary, "per_volume": per_volume, "wall_time_s": wall,
              "threads": torch.get_num_threads(), "world_size": world}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    history.save(out / "history.json")
    # Middle slice of up to 8 test volumes spread over the list, at the training size for a regular grid.
    shown = [test[int(i)] for i in np.unique(np.linspace(0, len(test) - 1, min(8, len(test))).round())]
    mids = [len(v[1]) // 2 for v in shown]
    preds = segment(net, [(n, im[k:k + 1], lb[k:k + 1]) for (n, im, lb), k in zip(shown, mids, strict=True)], args)
    fit = lambda arrays: np.concatenate([fit_size(a, args.image_size) for a in arrays])  # noqa: E731
    training_figure(history, fit([im[k:k + 1] for (_, im, _), k in zip(shown, mids, strict=True)]),
                    fit([lb[k:k + 1] for (_, _, lb), k in zip(shown, mids, strict=True)]), fit(preds),
                    out / "results.png", class_names=list(args.classes),
                    title=f"{args.method}, test mean Dice {summary['mean']['dice']['mean']:.3f}")
    print(f"wrote {out / 'metrics.json'} and {out / 'results.png'} ({wall:.0f} s)")
    return result


if __name__ == "__main__":
    main()
