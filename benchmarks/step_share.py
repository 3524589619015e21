"""How much of an example's training step its contrastive loss takes.

    python -m benchmarks.step_share                      # the presets' sizes (a GPU's job; minutes on a CPU)
    python -m benchmarks.step_share --scale quick        # small images and batches: the wiring, on a CPU
    python -m benchmarks.step_share --device cuda --out DIR

One training step of each example pipeline at its preset's size — zero_grad, the model's forward
pass(es), every loss, backward, the optimizer step — timed with its contrastive loss and without it
(alternating rounds, medians): the difference is what the loss costs the step, the backward of the
projection head included (only the contrastive loss reads the head). ``clcc-kvasir``:
``examples/train_cross_level.py``'s joint step (full image and patches through the U-Net,
supervised BCE + Dice, ``CrossLevelContrast``, ``CrossLevelConsistency``); ``ssl4mis-acdc``:
``examples/train_pseudo_label.py``'s stage-2 step (U-Net with its projection head, Dice + CE on the
labelled slices, ``PseudoLabelContrast`` in prototype mode on every slice with pseudo-labels and
confidences). The target on a GPU: the loss takes at most 10% of the step.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.crossover import interleaved_medians
from benchmarks.harness import cuda_peak, release_cuda
from contrastkit import CrossLevelConsistency, CrossLevelContrast, PseudoLabelContrast, cross_level_views
from contrastkit.models import UNet
from contrastkit.segmentation import bce_dice_loss, dice_ce_loss

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SHARE = 0.10  # of the step, on a GPU


@dataclass(frozen=True)
class Size:
    batch: int
    labeled: int
    image: int
    grid: int = 5


# The presets' sizes (examples/presets.py) and a quick scale for CPUs.
SIZES = {
    "full": {"clcc-kvasir": Size(8, 4, 320), "ssl4mis-acdc": Size(24, 12, 256)},
    "quick": {"clcc-kvasir": Size(4, 2, 80), "ssl4mis-acdc": Size(4, 2, 64)},
}


def cross_level_step(size: Size, device: str, generator: torch.Generator) -> Callable[[bool], torch.Tensor]:
    net = UNet(3, 1, base_width=16, depth=4, proj_dim=32).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    contrast, consistency = CrossLevelContrast(temperature=0.07), CrossLevelConsistency()
    images = torch.randn(size.batch, 3, size.image, size.image, generator=generator).to(device)
    masks = (torch.rand(size.labeled, 1, size.image, size.image, generator=generator) > 0.7).float().to(device)

    def step(with_contrast: bool) -> torch.Tensor:
        views = cross_level_views(net, images, size.grid)
        total = bce_dice_loss(views.full_logits[:size.labeled], masks)
        total = total + size.grid**2 * consistency(views.patch_logits, views.full_logits)
        if with_contrast:
            total = total + contrast(views.global_map, views.local_map)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return total.detach()

    return step


def pseudo_label_step(size: Size, device: str, generator: torch.Generator) -> Callable[[bool], torch.Tensor]:
    classes = 4
    net = UNet(1, classes, base_width=16, depth=4, proj_dim=32).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    contrast = PseudoLabelContrast(temperature=0.1, mode="prototype", num_classes=classes)
    shape = (size.batch, size.image, size.image)
    images = torch.randn(size.batch, 1, size.image, size.image, generator=generator).to(device)
    labels = torch.randint(0, classes, shape, generator=generator).to(device)
    confidence = torch.rand(shape, generator=generator).to(device)

    def step(with_contrast: bool) -> torch.Tensor:
        output = net(images, return_features=True)
        total = dice_ce_loss(output.logits[:size.labeled], labels[:size.labeled])
        if with_contrast:
            total = total + contrast(output.projection, labels, confidence)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return total.detach()

    return step


CASES = {"clcc-kvasir": cross_level_step, "ssl4mis-acdc": pseudo_label_step}


def measure(name: str, scale: str, device: str, budget_s: float) -> dict:
    size = SIZES[scale][name]
    step = CASES[name](size, device, torch.Generator().manual_seed(0))
    sides = [lambda: step(True), lambda: step(False)]
    (with_s, without_s), rounds = interleaved_medians(sides, device, budget_s)
    row = dict(case=name, size=f"{size.batch}×{size.image}²", device=device, rounds=rounds,
               with_ms=with_s * 1e3, without_ms=without_s * 1e3, share=max(0.0, 1 - without_s / with_s))
    if device == "cuda":
        row["with_peak"], row["without_peak"] = (cuda_peak(side)[0] for side in sides)
        release_cuda()
    return row


def table(rows: list[dict]) -> str:
    lines = ["| example step | size | with its contrastive loss ms | without ms | the loss's share | rounds |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['size']} | {r['with_ms']:.1f} | {r['without_ms']:.1f} | "
                     f"{r['share']:.1%} | {r['rounds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", choices=tuple(SIZES), default="full")
    parser.add_argument("--budget-s", type=float, default=20.0, help="time for the rounds of one example")
    parser.add_argument("--out", type=Path, help="write step-share-<device>-<date>.{md,json} there")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    rows = []
    for name in CASES:
        rows.append(measure(name, args.scale, args.device, args.budget_s))
        print(f"{name}: with {rows[-1]['with_ms']:.1f} ms, without {rows[-1]['without_ms']:.1f} ms, "
              f"share {rows[-1]['share']:.1%}", flush=True)
    print(table(rows))
    if args.out:
        from benchmarks.report import device_slug, run_facts

        facts = run_facts(args.device, args.scale)
        stem = args.out / f"step-share-{device_slug(facts['device'])}-{facts['date']}"
        args.out.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps({**facts, "target_share": TARGET_SHARE, "rows": rows},
                                                        indent=1) + "\n")
        stem.with_suffix(".md").write_text(
            f"# The contrastive loss's share of a training step — {facts['device']}, {facts['date']}\n\n"
            f"- commit {facts['commit']}; scale {args.scale}; medians of alternating rounds; target on a GPU: "
            f"at most {TARGET_SHARE:.0%}\n- the share is the loss and the backward of the projection head it "
            f"alone reads\n" + (f"- {facts['note']}\n" if facts.get("note") else "") + "\n" + table(rows))
        print(f"written: {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
