"""What the example scripts share: presets of published protocols, the run flags, pre-trained weights.

``--preset NAME`` sets every flag of the preset; flags given on the command line override it
(``--preset ssl4mis-acdc --labeled-patients 7``). :func:`add_run_arguments` adds the flags of how
a run trains (optimiser, schedule, precision, devices, resume, time budget), the same in both
scripts. The scripts import this module: copy it along with the script. :func:`save_pretrained` and
:func:`load_pretrained` write and read the weights ``pretrain_global_local.py`` hands to
``train_pseudo_label.py --init``.

Sources (see examples/README.md for what each preset keeps and what it cannot):

* ``clcc-kvasir`` — Zhao et al., "Cross-level contrastive learning and consistency
  constraint for semi-supervised medical image segmentation", ISBI 2022, and its code
  (github.com/ShinkaiZ/CLCC-semi, ``expconfigs/exp_kvasir_pct10.yaml`` and ``config.py``):
  320×320 images, a 5×5 grid of 64×64 patches, batches of 8 with 4 labeled, 10% labels,
  300 epochs (an epoch is a pass over the labeled images) of which the first 100 train
  supervised + contrast and the rest supervised + consistency, both weighted 1.0; AdamW,
  learning rate 1e-3, weight decay 1e-2, cosine schedule after a 100-epoch linear warm-up;
  U-Net with ``FEATURE_SCALE`` 4, i.e. widths 16…256 (base width 16, depth 4).
* ``ssl4mis-acdc`` — Luo et al., SSL4MIS (github.com/HiLab-git/SSL4MIS, ACDC 2D scripts):
  256×256 slices, batches of 24 with 12 labeled, 30,000 iterations, SGD with learning rate
  0.01, momentum 0.9 and weight decay 1e-4, poly schedule ``lr·(1 − iter/30000)^0.9``,
  validation every 200 iterations, 3 or 7 labeled patients (3 here; ``--labeled-patients 7``),
  U-Net widths 16…256. Here the 30,000 iterations are 15,000 supervised (stage 1) and 3
  pseudo-label rounds of 5,000 (stage 2); ``--method supervised`` trains all 30,000 supervised.
* ``chaitanya2020-acdc`` — Chaitanya et al., "Contrastive learning of global and local features
  for medical image segmentation with limited annotations", NeurIPS 2020, and its code
  (github.com/krishnabits001/domain_specific_cl, TensorFlow 1.12): slices resized to 192×192,
  52 unlabeled ACDC volumes, each cut into 4 partitions, temperature 0.1, learning rate 1e-3
  (Adam, constant), about 10,000 iterations for each of the global and the local stage, batches
  of 12 slices (8 for G^D: the script's default ``--batch`` follows that rule).
"""

from __future__ import annotations

import argparse
import math

import torch

PRESETS = {
    "clcc-kvasir": {
        "script": "train_cross_level",
        "source": "Zhao et al., ISBI 2022 (CLCC-semi); github.com/ShinkaiZ/CLCC-semi exp_kvasir_pct10.yaml",
        "values": {
            "method": "cross_level", "schedule": "sequential", "labeled_fraction": 0.1,
            "image_size": 320, "grid": 5, "width": 16, "depth": 4,
            "batch": 8, "labeled_batch": 4, "epochs": 300, "warmup": 1 / 3,
            "contrast_weight": 1.0, "consistency_weight": 1.0, "temperature": 0.07,
            "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-2,
            "lr_schedule": "cosine", "lr_warmup": 1 / 3, "eval_every": 100, "norm": "batch",
        },
    },
    "ssl4mis-acdc": {
        "script": "train_pseudo_label",
        "source": "Luo et al., SSL4MIS (github.com/HiLab-git/SSL4MIS), ACDC 2D protocol",
        "values": {
            "image_size": 256, "width": 16, "depth": 4, "labeled_patients": 3,
            "batch": 24, "labeled_batch": 12, "iterations": 15000, "rounds": 3, "refresh_every": 5000,
            "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
            "lr_schedule": "poly", "lr_warmup": 0, "eval_every": 200,
        },
    },
    "chaitanya2020-acdc": {
        "script": "pretrain_global_local",
        "source": "Chaitanya et al., NeurIPS 2020; github.com/krishnabits001/domain_specific_cl",
        "values": {
            "image_size": 192, "volumes": 52, "partitions": 4, "tau": 0.1, "strategy": "GD",
            "iterations": 10000, "local_iterations": 10000, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0,
            "lr_schedule": "constant", "lr_warmup": 0, "eval_every": 500,
        },
    },
}

_UNSET = object()


def add_preset_argument(parser: argparse.ArgumentParser, script: str) -> None:
    """``--preset`` with the presets of ``script`` (the file name without ``.py``) as choices."""
    names = sorted(name for name, preset in PRESETS.items() if preset["script"] == script)
    parser.add_argument("--preset", choices=names, default=None,
                        help="a published protocol's settings; flags given explicitly override them "
                             "(sources in examples/README.md)")


def explicit_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The destinations of the flags ``argv`` sets explicitly (whatever value they give).

    Parses ``argv`` into a namespace whose attributes are already set to a marker (argparse
    then applies no defaults): an attribute that changed was given. Accumulating actions
    (append, count) build on the attribute's value, so their marker is None.
    """
    accumulating = (argparse._AppendAction, argparse._CountAction)
    markers = {a.dest: None if isinstance(a, accumulating) else _UNSET
               for a in parser._actions if a.dest != argparse.SUPPRESS}
    parsed = parser.parse_args(argv, namespace=argparse.Namespace(**markers))
    return {dest for dest, value in vars(parsed).items() if value is not markers.get(dest, _UNSET)}


def apply_preset(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> argparse.Namespace:
    """Sets ``args.preset``'s values on ``args`` except for flags ``argv`` gave explicitly.

    Records the destinations the preset set in ``args.preset_values`` (empty without a preset).
    """
    args.preset_values = []
    if args.preset is None:
        return args
    explicit = explicit_flags(parser, argv)
    for dest, value in PRESETS[args.preset]["values"].items():
        if not hasattr(args, dest):
            raise KeyError(f"preset {args.preset!r} sets {dest!r}, which this script has no flag for")
        if dest not in explicit:
            setattr(args, dest, value)
            args.preset_values.append(dest)
    return args


def flag(args: argparse.Namespace, dest: str) -> str:
    """``--flag-name VALUE`` for error messages, noting a value that came from the preset."""
    text = f"--{dest.replace('_', '-')} {getattr(args, dest)}"
    if dest in getattr(args, "preset_values", ()):
        text += f" (from --preset {args.preset})"
    return text


def ranged(kind, low=None, high=None, *, open_low=False, open_high=False):
    """An argparse ``type``: an int or float (``kind``) in [low, high], an end given as None being
    unbounded and ``open_low`` / ``open_high`` excluding it. argparse puts the flag before the message:
    "argument --iterations: expected an int >= 1; got 0"."""
    bounds = [f"{'>' if open_low else '>='} {low}" if low is not None else "",
              f"{'<' if open_high else '<='} {high}" if high is not None else ""]
    if low is not None and high is not None:
        bounds = [f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"]
    text = f"{'an int' if kind is int else 'a number'} {' '.join(b for b in bounds if b)}".strip()

    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {text}; got {value!r}") from None
        below = low is not None and (number <= low if open_low else number < low)
        above = high is not None and (number >= high if open_high else number > high)
        if below or above or not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"expected {text}; got {value}")
        return number

    return parse


POSITIVE_INT, COUNT = ranged(int, 1), ranged(int, 0)
POSITIVE, NON_NEGATIVE = ranged(float, 0, open_low=True), ranged(float, 0)


def add_run_arguments(parser: argparse.ArgumentParser, *, lr: float, out: str, norm: str = "batch") -> None:
    """The flags of how a run trains, shared by both scripts (``lr``, ``out`` and ``norm`` are their defaults)."""
    from contrastkit.training import SCHEDULES

    p = parser
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--lr", type=POSITIVE, default=lr, help="base learning rate, > 0")
    p.add_argument("--momentum", type=NON_NEGATIVE, default=0.9, help="SGD momentum, >= 0")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=1e-4, help=">= 0")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default="poly",
                   help="over all iterations: poly lr·(1 − step/total)^0.9 (SSL4MIS); cosine; constant")
    p.add_argument("--lr-warmup", type=NON_NEGATIVE, default=0,
                   help="linear learning-rate warm-up: a fraction of the iterations (< 1) or iterations (>= 1)")
    p.add_argument("--norm", choices=("batch", "group"), default=norm, help="U-Net normalisation layers")
    p.add_argument("--sync-bn", action="store_true", help="torchrun on GPUs: BatchNorm statistics over all ranks")
    p.add_argument("--no-augment", action="store_true", help="no flips or rotations")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="mixed precision: autocast to bfloat16, or float16 with gradient scaling")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for weights and inputs")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model for training (backend inductor unless given)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=COUNT, default=0, help="seeds the model, sampler and augmentation; an int >= 0")
    p.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help="torch CPU threads, an int >= 1 (default: torch's choice)")
    p.add_argument("--out", default=out)
    p.add_argument("--resume", default=None,
                   help="a last.pt checkpoint to continue from, with the settings it was trained with (see "
                        "'Resuming' in examples/README.md); --out may be another folder")
    p.add_argument("--resume-anyway", action="store_true",
                   help="--resume with settings that differ from the checkpoint's; metrics.json records both")
    p.add_argument("--time-budget", type=POSITIVE, default=None, metavar="SECONDS",
                   help="stop after this wall time (> 0): validate, keep the best checkpoint, test it, write metrics")


def check_resume(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stops on a ``--resume`` file that is not a checkpoint, or one trained with other settings
    than ``args`` (beyond ``RESUME_MAY_CHANGE``) unless ``--resume-anyway`` is given."""
    from contrastkit.training import checkpoint_state, compare_configs

    if args.resume is None:
        return
    try:
        state = checkpoint_state(args.resume)
    except (OSError, ValueError) as err:
        parser.error(f"--resume {args.resume}: {err}")
    differences = compare_configs(state.get("config", {}), vars(args))
    if "optimizer" in differences:
        saved, ours = differences["optimizer"]
        parser.error(f"--optimizer {ours}: --resume {args.resume} was trained with --optimizer {saved}, whose state "
                     f"{ours} cannot take over, even with --resume-anyway; resume with --optimizer {saved}")
    if differences and not args.resume_anyway:
        listed = ", ".join(f"--{k.replace('_', '-')} {ours!r} (checkpoint: {saved!r})"
                           for k, (saved, ours) in differences.items())
        parser.error(f"--resume {args.resume} was trained with other settings: {listed}. Give the checkpoint's "
                     "values, or add --resume-anyway to continue with these (metrics.json then records both)")


def make_optimizer(args: argparse.Namespace, parameters) -> torch.optim.Optimizer:
    """``--optimizer`` with ``--lr``, ``--momentum`` (SGD) and ``--weight-decay``."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)


# ----------------------------------------------------------------------------- pre-trained weights

PRETRAINED_FORMAT = "contrastkit-pretrained-unet"


def save_pretrained(path, tensors: dict, *, unet: dict, parts: dict, config: dict) -> None:
    """Writes the pre-trained tensors of a U-Net (``tensors``: names as in its ``state_dict``), the
    settings that fix their shapes (``unet``) and which parts they are (``parts``), atomically."""
    from pathlib import Path

    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": PRETRAINED_FORMAT, "state_dict": {k: v.detach().cpu().clone() for k, v in tensors.items()},
                "unet": dict(unet), "parts": dict(parts), "config": dict(config)}, tmp)
    tmp.replace(path)


def read_pretrained(path) -> dict:
    """The content of a :func:`save_pretrained` file; ValueError naming ``path`` for any other file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - torch.load raises many kinds for a file that is not a checkpoint
        raise ValueError(f"{path}: not a checkpoint torch can read ({err})") from None
    if not isinstance(payload, dict) or payload.get("format") != PRETRAINED_FORMAT:
        raise ValueError(f"{path} is not a pre-trained U-Net file (pretrain_global_local.py writes them: "
                         "OUT/pretrained.pt or OUT/pretrained_global.pt)")
    return payload


def load_pretrained(model: torch.nn.Module, path) -> list[str]:
    """Copies the tensors of a :func:`save_pretrained` file into ``model`` (a U-Net) and returns their names.

    Loads exactly the tensors the file holds (the encoder and the pre-trained decoder blocks, with
    their BatchNorm statistics); everything else in ``model`` (the other decoder blocks, the
    segmentation head, the projection head) keeps its initialisation. Nothing is loaded when a
    tensor of the file is missing from ``model`` or has another shape there: the ValueError names
    each such tensor with both shapes, and the settings the file was pre-trained with.
    """
    payload = read_pretrained(path)
    tensors, own = payload["state_dict"], model.state_dict()
    missing = [name for name in tensors if name not in own]
    shapes = [f"{name} {tuple(tensor.shape)} (model: {tuple(own[name].shape)})"
              for name, tensor in tensors.items() if name in own and own[name].shape != tensor.shape]
    if missing or shapes:
        problems = ([f"{len(shapes)} tensor(s) of another shape: " + ", ".join(shapes[:6])
                     + (", ..." if len(shapes) > 6 else "")] if shapes else []) + \
                   ([f"{len(missing)} tensor(s) the model lacks: " + ", ".join(missing[:6])
                     + (", ..." if len(missing) > 6 else "")] if missing else [])
        settings = ", ".join(f"{k}={v!r}" for k, v in payload["unet"].items())
        raise ValueError(f"--init {path} does not fit this U-Net: {'; '.join(problems)}. It was pre-trained with "
                         f"{settings}: fine-tune with the same --width, --depth and --norm")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)
    return list(tensors)
