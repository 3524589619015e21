"""Seed studies of the example pipelines: run arms x seeds side by side, then one table with intervals.

    python examples/study.py run kvasir-cpu --out runs/kvasir-cpu          # 2 runs at a time, 1 thread each
    python examples/study.py run gpu-kvasir --data-root PACK --budget-s 170  # every run at once on one GPU
    python examples/study.py run tiny --out runs/tiny                      # the whole agenda in < 1 min, CPU
    python examples/study.py summarize runs/kvasir-cpu --baseline supervised --out examples/results/kvasir-cpu

A run is ``<arm>_s<seed>/`` under ``--out`` holding the training script's ``metrics.json``. The summary
gives per arm the mean ± sample std over seeds of the test metrics, and per arm against the baseline
the paired difference over the seeds both have: mean, 95% t-interval and t statistic. Checkpoints are
chosen on validation by the training scripts; nothing here looks at the test split to choose anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGE1_FROM = "--stage1-from"
INIT = "--init"
PRETRAINED = "pretrained.pt"  # what pretrain_global_local.py writes last before its metrics
RUN_NAME = re.compile(r"^(?P<arm>.+)_s(?P<seed>\d+)$")


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Arm:
    name: str
    script: str  # train_cross_level.py, train_pseudo_label.py or pretrain_global_local.py
    args: tuple[str, ...]
    stage1_from: str | None = None  # the arm of the same seed whose end of stage 1 this one starts from
    init_from: str | None = None  # the pre-training arm of the same seed whose pretrained.pt this one loads


@dataclass(frozen=True)
class Plan:
    """Arms x seeds with shared arguments; ``data`` names the folder under ``--data-root``."""

    description: str
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    common: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per script
    data: dict[str, str] = field(default_factory=dict)  # per script: folder under --data-root, or "synthetic"
    jobs: int = 2
    threads: int | None = 1
    baseline: dict[str, str] = field(default_factory=dict)  # per script: the arm differences are taken against


def _cross_level(name, *args):
    return Arm(name, "train_cross_level.py", args)


def _pseudo_label(name, *args, stage1_from=None, init_from=None):
    return Arm(name, "train_pseudo_label.py", args, stage1_from, init_from)


def _pretrain(name, *args):
    return Arm(name, "pretrain_global_local.py", args)


KVASIR_CPU = ("--labeled-fraction", "0.1", "--image-size", "128", "--grid", "4", "--width", "16", "--depth", "3",
              "--iterations", "1200", "--eval-every", "100", "--lr-schedule", "poly", "--norm", "batch")
ACDC_CPU = ("--labeled-patients", "3", "--image-size", "128", "--width", "16", "--depth", "4", "--iterations",
            "800", "--rounds", "2", "--eval-every", "200", "--val-volumes", "10", "--lr-schedule", "poly")
GPU_KVASIR = ("--preset", "clcc-kvasir", "--iterations", "1500", "--eval-every", "100", "--amp", "bf16")
GPU_ACDC = ("--preset", "ssl4mis-acdc", "--iterations", "600", "--rounds", "2", "--refresh-every", "300",
            "--eval-every", "100", "--amp", "bf16")
# Chaitanya et al. (NeurIPS 2020) shortened for 2 CPU cores: 64x64 slices, U-Net width 16 / depth 3,
# 600 global (G^D, 2 volumes x 4 partitions per batch) + 600 local iterations (2 of 3 decoder blocks)
# on the 140 training volumes, then 500 + 500 fine-tuning iterations with 3 labeled patients.
PRETRAIN_CPU = ("--image-size", "64", "--width", "16", "--depth", "3", "--strategy", "GD", "--partitions", "4",
                "--batch", "8", "--iterations", "600", "--local-iterations", "600", "--regions", "2",
                "--eval-every", "100", "--val-volumes", "10")
FINETUNE_CPU = ("--labeled-patients", "3", "--image-size", "64", "--width", "16", "--depth", "3", "--iterations",
                "500", "--rounds", "2", "--eval-every", "100", "--val-volumes", "10", "--lr-schedule", "poly")
PIXEL = ("--method", "pseudo_label", "--mode", "pixel", "--anchors-per-class", "128")
# Random vs pre-trained init, each fine-tuned supervised and with pixel pseudo-label contrast (the pixel arms
# start stage 2 from the supervised run of the same init and seed).
PRETRAIN_ARMS = (_pretrain("pretrain"),
                 _pseudo_label("supervised", "--method", "supervised"),
                 _pseudo_label("pretrained_supervised", "--method", "supervised", init_from="pretrain"),
                 _pseudo_label("pixel", *PIXEL, stage1_from="supervised"),
                 _pseudo_label("pretrained_pixel", *PIXEL, stage1_from="pretrained_supervised", init_from="pretrain"))
# The same arms at the reference settings (--preset chaitanya2020-acdc: 192x192, 52 volumes, G^D, batch 8,
# lr 1e-3) but 2,000 instead of 10,000 iterations per stage, then 1 labeled patient (2 volumes, the
# paper's "2 labeled volumes" setting) fine-tuned for 1,500 + 1,500 iterations at the same size, bf16.
PRETRAIN_GPU = ("--preset", "chaitanya2020-acdc", "--depth", "4", "--iterations", "2000", "--local-iterations",
                "2000", "--regions", "3", "--eval-every", "500", "--amp", "bf16")
FINETUNE_GPU = ("--labeled-patients", "1", "--image-size", "192", "--width", "16", "--depth", "4", "--iterations",
                "1500", "--rounds", "2", "--eval-every", "100", "--lr", "1e-3", "--amp", "bf16")
TINY_POLYP = ("--synthetic-size", "40", "--image-size", "32", "--grid", "2", "--width", "4", "--depth", "2",
              "--batch", "4", "--labeled-batch", "2", "--labeled-fraction", "0.25", "--iterations", "4",
              "--eval-every", "2")
TINY_CARDIAC = ("--synthetic-volumes", "4", "--labeled-patients", "1", "--image-size", "32", "--width", "4",
                "--depth", "2", "--iterations", "2", "--rounds", "1", "--eval-every", "2", "--batch", "4",
                "--labeled-batch", "2", "--val-volumes", "1", "--test-volumes", "2")

PLANS = {
    "kvasir-cpu": Plan(
        "Kvasir-SEG 10% labels, 128x128, 1200 iterations, poly LR: supervised vs cross-level, 5 seeds",
        (_cross_level("supervised", "--method", "supervised"), _cross_level("cross_level", "--method", "cross_level")),
        seeds=(0, 1, 2, 3, 4), common={"train_cross_level.py": KVASIR_CPU},
        data={"train_cross_level.py": "kvasir-seg"}, baseline={"train_cross_level.py": "supervised"}),
    "acdc-cpu": Plan(
        "ACDC 3 labeled patients, 128x128, 800 + 800 iterations, poly LR: supervised vs prototype vs pixel, 3 seeds "
        "(prototype and pixel start stage 2 from the supervised run's step 800: stage 1 is the same)",
        (_pseudo_label("supervised", "--method", "supervised"),
         _pseudo_label("prototype", "--method", "pseudo_label", "--mode", "prototype", stage1_from="supervised"),
         _pseudo_label("pixel", "--method", "pseudo_label", "--mode", "pixel", "--anchors-per-class", "128",
                       stage1_from="supervised")),
        seeds=(0, 1, 2), common={"train_pseudo_label.py": ACDC_CPU}, data={"train_pseudo_label.py": "acdc"},
        baseline={"train_pseudo_label.py": "supervised"}),
    "acdc-pretrain-cpu": Plan(
        "ACDC 3 labeled patients, 64x64: random init vs global (G^D) + local contrastive pre-training (600 + 600 "
        "iterations on the 140 training volumes), then supervised fine-tuning or pseudo-label pixel mode "
        "(500 + 500 iterations), 3 seeds, one run at a time (pixel arms start stage 2 from the supervised run of "
        "the same init and seed)",
        PRETRAIN_ARMS,
        seeds=(0, 1, 2), common={"train_pseudo_label.py": FINETUNE_CPU, "pretrain_global_local.py": PRETRAIN_CPU},
        data={"train_pseudo_label.py": "acdc", "pretrain_global_local.py": "acdc"}, jobs=1,
        baseline={"train_pseudo_label.py": "supervised"}),
    # One data set per device call (each packed copy nearly fills the 64 MiB a call carries). Iteration
    # counts are fixed so that the arms compare at equal iterations; they are guesses for an H100/H200
    # shared by every run of the call, and the wall budget stops a run that is slower than guessed
    # (metrics.json then says stopped_at_time_budget: the table must say so too).
    "gpu-kvasir": Plan(
        "GPU: Kvasir-SEG 10% labels, CLCC-semi protocol (320x320, 5x5 grid) shortened to 1,500 iterations, "
        "bf16: supervised vs cross-level, 3 seeds, all at once on one GPU",
        (_cross_level("supervised", "--method", "supervised"), _cross_level("cross_level", "--method", "cross_level")),
        seeds=(0, 1, 2), common={"train_cross_level.py": GPU_KVASIR}, data={"train_cross_level.py": "kvasir-seg"},
        jobs=6, threads=2, baseline={"train_cross_level.py": "supervised"}),
    "gpu-acdc": Plan(
        "GPU: ACDC 3 labeled patients, SSL4MIS protocol (256x256, batch 24/12, SGD 0.01 poly) shortened to "
        "600 + 2 x 300 iterations, bf16: supervised vs prototype vs pixel (128 anchors/class) vs pixel with "
        "every labeled and confident pixel an anchor, 3 seeds, all at once on one GPU",
        (_pseudo_label("supervised", "--method", "supervised"),
         _pseudo_label("prototype", "--method", "pseudo_label", "--mode", "prototype"),
         _pseudo_label("pixel", "--method", "pseudo_label", "--mode", "pixel", "--anchors-per-class", "128"),
         _pseudo_label("pixel_all", "--method", "pseudo_label", "--mode", "pixel")),
        seeds=(0, 1, 2), common={"train_pseudo_label.py": GPU_ACDC}, data={"train_pseudo_label.py": "acdc"},
        jobs=12, threads=2, baseline={"train_pseudo_label.py": "supervised"}),
    "gpu-acdc-pretrain": Plan(
        "GPU: ACDC 1 labeled patient (2 volumes), Chaitanya et al. 2020 reference settings (192x192, 52 volumes, "
        "G^D, 4 partitions, tau 0.1, lr 1e-3) shortened to 2,000 + 2,000 pre-training and 1,500 + 1,500 "
        "fine-tuning iterations, bf16: random vs pre-trained init, supervised vs pixel pseudo-label, 3 seeds",
        PRETRAIN_ARMS,
        seeds=(0, 1, 2), common={"train_pseudo_label.py": FINETUNE_GPU, "pretrain_global_local.py": PRETRAIN_GPU},
        data={"train_pseudo_label.py": "acdc", "pretrain_global_local.py": "acdc"}, jobs=8, threads=2,
        baseline={"train_pseudo_label.py": "supervised"}),
    "tiny": Plan(
        "the agenda's machinery on synthetic data in seconds (CI): both scripts, two arms each, two seeds",
        (_cross_level("supervised", "--method", "supervised"), _cross_level("cross_level", "--method", "cross_level"),
         _pseudo_label("cardiac_supervised", "--method", "supervised"),
         _pseudo_label("cardiac_prototype", "--method", "pseudo_label", stage1_from="cardiac_supervised")),
        seeds=(0, 1), common={"train_cross_level.py": TINY_POLYP, "train_pseudo_label.py": TINY_CARDIAC},
        data={"train_cross_level.py": "synthetic", "train_pseudo_label.py": "synthetic"},
        baseline={"train_cross_level.py": "supervised", "train_pseudo_label.py": "cardiac_supervised"}),
}


def commands(plan: Plan, out: Path, data_root: Path | None, budget_s: float | None, device: str | None,
             seeds=None) -> list[tuple[str, list[str]]]:
    """(run folder name, argv) of every run of the plan, seeds outermost so that a cut-short study has
    every arm at its first seeds."""
    runs = []
    for seed in seeds or plan.seeds:
        for arm in plan.arms:
            data = plan.data.get(arm.script, "synthetic")
            if data != "synthetic":
                if data_root is None:
                    raise ValueError(f"the plan reads {data}/: give --data-root (the folder holding it) or set "
                                     "$CONTRASTKIT_DATA")
                data = str(data_root / data)
            argv = [sys.executable, str(HERE / arm.script), *plan.common.get(arm.script, ()), *arm.args,
                    "--data", data, "--seed", str(seed), "--out", str(out / f"{arm.name}_s{seed}")]
            if arm.stage1_from:
                argv += [STAGE1_FROM, str(out / f"{arm.stage1_from}_s{seed}")]
            if arm.init_from:
                argv += [INIT, str(out / f"{arm.init_from}_s{seed}" / PRETRAINED)]
            if plan.threads:
                argv += ["--threads", str(plan.threads)]
            if budget_s:
                argv += ["--time-budget", str(budget_s)]
            if device:
                argv += ["--device", device]
            runs.append((f"{arm.name}_s{seed}", argv))
    return runs


def _waits_for(argv: list[str]) -> list[Path]:
    """The files of other runs a run starts from: their stage-1 checkpoint, their pre-trained weights."""
    waits = [Path(argv[argv.index(STAGE1_FROM) + 1]) / "stage1.pt"] if STAGE1_FROM in argv else []
    return waits + ([Path(argv[argv.index(INIT) + 1])] if INIT in argv else [])


def run_plan(plan: Plan, out: Path, jobs: int, runs: list[tuple[str, list[str]]], deadline_s: float | None) -> list:
    """Runs ``jobs`` at a time, in order, except that a run starting from another's stage 1 waits
    until that run has written it (the next ready run takes the slot). A run still going at
    ``deadline_s`` (the scripts stop themselves at their budget first) is ended. A run with a
    ``metrics.json`` is skipped and one with only a ``last.pt`` resumes from it, so a study stopped
    at any point continues where it was. A run that loads another's pre-trained weights (``--init``)
    waits for them in the same way. Returns (name, exit code, seconds) per run; a run whose stage 1
    or weights never came (its source failed) counts as failed."""
    out.mkdir(parents=True, exist_ok=True)
    pending, running, done = list(runs), {}, []
    start = time.monotonic()

    def ready(run):
        name, argv = run
        return all(source.is_file() for source in _waits_for(argv)) or (out / name / "last.pt").is_file() \
            or (out / name / "metrics.json").is_file()

    while pending or running:
        while len(running) < jobs and any(ready(run) for run in pending):
            name, argv = pending.pop(next(i for i, run in enumerate(pending) if ready(run)))
            if (out / name / "metrics.json").is_file():
                done.append((name, 0, 0.0))  # finished in an earlier call: a study resumes where it stopped
                continue
            last = out / name / "last.pt"
            if last.is_file():  # cut short in an earlier call: continue from its checkpoint (resume is bit-exact)
                if STAGE1_FROM in argv:
                    at = argv.index(STAGE1_FROM)
                    argv = argv[:at] + argv[at + 2:]
                argv = [*argv, "--resume", str(last)]
            log = open(out / f"{name}.log", "a" if last.is_file() else "w")  # noqa: SIM115 - closed when it ends
            running[name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log, time.monotonic())
            print(f"started {name}", flush=True)
        if pending and not running and not any(ready(run) for run in pending):
            for name, argv in pending:
                missing = [str(path) for path in _waits_for(argv) if not path.is_file()]
                print(f"FAILED {name}: {', '.join(missing)} was never written", flush=True)
                done.append((name, 1, 0.0))
            pending = []
        for name, (process, log, began) in list(running.items()):
            code = process.poll()
            if code is None and deadline_s is not None and time.monotonic() - start > deadline_s:
                process.kill()
                code = process.wait()
            if code is not None:
                log.close()
                del running[name]
                done.append((name, code, time.monotonic() - began))
                print(f"{'finished' if code == 0 else f'FAILED ({code})'} {name} in {done[-1][2]:.0f} s", flush=True)
        time.sleep(0.5)
    return done


# ----------------------------------------------------------------------------- summary


def t_quantile(p: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, dof))


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict:
    """a - b over the seeds both have: mean, sample std, 95% t-interval, t statistic."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return {"seeds": [], "n": 0}
    mean, std = _mean_std(diffs)
    result = {"seeds": seeds, "n": len(diffs), "per_seed": diffs, "mean": mean, "std": std}
    if len(diffs) >= 2 and std > 0:
        half = t_quantile(0.975, len(diffs) - 1) * std / math.sqrt(len(diffs))
        result.update(ci95=[mean - half, mean + half], t=mean / (std / math.sqrt(len(diffs))))
    return result


def run_metrics(metrics: dict) -> dict[str, float]:
    """The test numbers a study compares, from either script's metrics.json."""
    test = metrics["test"]
    if "mean" in test and isinstance(test["mean"], dict):  # cardiac: per class and their mean
        out = {"dice": test["mean"]["dice"]["mean"], "hd95": test["mean"]["hd95"]["mean"]}
        out.update({f"dice_{name}": value["dice"]["mean"] for name, value in test.items() if name != "mean"})
        return out
    return {name: test[name]["mean"] for name in ("dice", "iou", "precision", "recall", "hd95")}


def collect(runs_dir: Path) -> dict[str, dict[int, dict]]:
    """arm -> seed -> metrics.json of every finished run under ``runs_dir``."""
    found: dict[str, dict[int, dict]] = {}
    for path in sorted(runs_dir.glob("*/metrics.json")):
        match = RUN_NAME.match(path.parent.name)
        if match is None:
            raise ValueError(f"{path.parent}: a run folder must be named <arm>_s<seed>")
        found.setdefault(match["arm"], {})[int(match["seed"])] = json.loads(path.read_text())
    if not found:
        raise FileNotFoundError(f"no <arm>_s<seed>/metrics.json under {runs_dir}")
    return found


def summarize(runs_dir: Path, baseline: str | None, facts: dict | None = None) -> dict:
    runs = collect(runs_dir)
    if baseline is not None and baseline not in runs:
        raise ValueError(f"baseline arm {baseline!r} has no finished run; arms: {sorted(runs)}")
    arms = {}
    for arm, by_seed in runs.items():
        per_seed = {seed: run_metrics(m) for seed, m in by_seed.items()}
        names = list(next(iter(per_seed.values())))
        arms[arm] = {
            "seeds": sorted(per_seed),
            "metrics": {name: _spread([per_seed[s][name] for s in sorted(per_seed)]) for name in names},
            "wall_time_s": [by_seed[s].get("wall_time_s") for s in sorted(per_seed)],
            "iterations_done": [by_seed[s].get("iterations_done") for s in sorted(per_seed)],
            "stopped_at_time_budget": [by_seed[s].get("stopped_at_time_budget", False) for s in sorted(per_seed)],
            "best_step": [by_seed[s].get("best_step") for s in sorted(per_seed)],
            "best_val_dice": _selection(by_seed),
            "config": {k: v for k, v in next(iter(by_seed.values()))["config"].items() if k not in ("seed", "out")},
        }
    differences = {}
    if baseline is not None:
        base = {s: run_metrics(m) for s, m in runs[baseline].items()}
        for arm, by_seed in runs.items():
            if arm == baseline:
                continue
            mine = {s: run_metrics(m) for s, m in by_seed.items()}
            differences[arm] = {name: paired_difference({s: v[name] for s, v in mine.items()},
                                                        {s: v[name] for s, v in base.items() if name in v})
                                for name in next(iter(mine.values()))}
    return {"facts": facts or {}, "baseline": baseline, "arms": arms, "differences": differences,
            "trained_at": trained_at(runs)}


def _spread(values: list[float]) -> dict:
    return dict(zip(("mean", "std"), _mean_std(values), strict=True)) | {"per_seed": values}


def _selection(by_seed: dict[int, dict]) -> dict | None:
    """The validation Dice of each seed's chosen checkpoint: the number to choose settings by (never
    the test columns). ``None`` when a run does not record it."""
    values = [by_seed[s].get("best_val_dice") for s in sorted(by_seed)]
    return None if any(v is None for v in values) else _spread(values)


def trained_at(runs: dict[str, dict[int, dict]]) -> list[str]:
    """The commits the runs trained at ("unknown" for a run without the record; "+" marks uncommitted
    changes). More than one means the comparison mixes code changes with the methods' effects."""
    def one(metrics):
        code = metrics.get("code") or {}
        return "unknown" if not code.get("commit") else code["commit"][:10] + ("+" if code.get("dirty") else "")

    return sorted({one(m) for by_seed in runs.values() for m in by_seed.values()})


def _fmt(value, scale=1.0, digits=3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * scale:.{digits}f}"


def markdown(summary: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    facts = summary["facts"]
    if facts:
        lines += [", ".join(f"{k}: {v}" for k, v in facts.items()), ""]
    commits = summary.get("trained_at", [])
    if len(commits) > 1:
        lines += [f"**The runs trained at different commits ({', '.join(commits)})**: the differences below may "
                  "mix code changes with the methods' effects.", ""]
    elif commits == ["unknown"]:
        lines += ["The runs do not record the commit they trained at (they predate that record).", ""]
    elif commits:
        lines += [f"Trained at commit: {commits[0]}.", ""]
    arms = summary["arms"]
    names = list(next(iter(arms.values()))["metrics"])
    selection = all(data.get("best_val_dice") for data in arms.values())
    if selection:
        lines += ["`val dice` is the validation Dice of each run's chosen checkpoint: choose settings by it; "
                  "the other columns are test.", ""]
    columns = ["val dice"] * selection + names
    lines += ["| arm | seeds | " + " | ".join(columns) + " | wall time per run | s per iteration |",
              "|---|---|" + "---|" * len(columns) + "---|---|"]
    for arm, data in arms.items():
        cells = [f"{_fmt(m['mean'])} ± {_fmt(m['std'])}"
                 for m in ([data["best_val_dice"]] if selection else []) + list(data["metrics"].values())]
        walls = [w for w in data["wall_time_s"] if w]
        seconds = sum(walls) / len(walls) if walls else None
        wall = "n/a" if seconds is None else f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
        done = [(w, i) for w, i in zip(data["wall_time_s"], data.get("iterations_done", []), strict=False) if w and i]
        per_step = f"{sum(w / i for w, i in done) / len(done):.3f}" if done else "n/a"
        cut = sum(bool(x) for x in data.get("stopped_at_time_budget", []))
        if cut:
            per_step += f" ({cut} cut by the time budget)"
        lines.append(f"| {arm} | {len(data['seeds'])} | " + " | ".join(cells) + f" | {wall} | {per_step} |")
    if summary["differences"]:
        lines += ["", f"Paired differences against `{summary['baseline']}` (same seeds; 95% t-interval):", "",
                  "| arm | metric | seeds | mean difference | 95% interval | t | per seed |",
                  "|---|---|---|---|---|---|---|"]
        for arm, by_metric in summary["differences"].items():
            for name, d in by_metric.items():
                if not d["n"]:
                    continue
                ci = d.get("ci95")
                lines.append(f"| {arm} | {name} | {d['n']} | {d['mean']:+.3f} | "
                             f"{'n/a' if ci is None else f'[{ci[0]:+.3f}, {ci[1]:+.3f}]'} | "
                             f"{_fmt(d.get('t'), digits=2)} | {', '.join(f'{x:+.3f}' for x in d['per_seed'])} |")
    return "\n".join(lines) + "\n"


def _facts() -> dict:
    facts = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
             "cpus": os.cpu_count()}
    try:
        facts["summarized at commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                       text=True, cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        facts["summarized at commit"] = "unknown"
    try:
        import torch

        facts["torch"] = torch.__version__
        if torch.cuda.is_available():
            facts["device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return facts


def figure(summary: dict, path: Path, metric: str = "dice", title: str = "") -> Path:
    """Left: every seed's test ``metric`` per arm, a seed's runs joined by a line, the arm's mean with
    its 95% t-interval. Right: the paired differences against the baseline, per seed and their mean
    with its 95% interval; the interval clearing zero is the question a study asks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    order = ([summary["baseline"]] if summary["baseline"] else []) + \
        [a for a in arms if a != summary["baseline"]]
    diffs = {a: d[metric] for a, d in summary["differences"].items() if d.get(metric, {}).get("n")}
    fig, axes = plt.subplots(1, 2 if diffs else 1, figsize=(9 if diffs else 5, 3.6), squeeze=False,
                             constrained_layout=True)
    ax = axes[0][0]
    seeds = sorted({s for a in order for s in arms[a]["seeds"]})
    for seed in seeds:
        points = [(i, arms[a]["metrics"][metric]["per_seed"][arms[a]["seeds"].index(seed)])
                  for i, a in enumerate(order) if seed in arms[a]["seeds"]]
        ax.plot(*zip(*points, strict=True), "o-", color="0.6", lw=0.8, ms=4, alpha=0.8)
    for i, a in enumerate(order):
        values = arms[a]["metrics"][metric]["per_seed"]
        mean, std = _mean_std(values)
        half = t_quantile(0.975, len(values) - 1) * std / math.sqrt(len(values)) if len(values) > 1 else 0.0
        ax.errorbar(i + 0.12, mean, yerr=half, fmt="D", color="#D55E00", capsize=4, ms=6,
                    label="mean, 95% interval" if i == 0 else None)
    # arm names that would run into each other break at their underscores
    crowded = sum(map(len, order)) > 9 * len(order)
    ax.set_xticks(range(len(order)), [a.replace("_", "\n") if crowded else a for a in order])
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"per seed (n = {len(seeds)}), lines join a seed")
    ax.legend(loc="best", fontsize=8)
    if diffs:
        ax = axes[0][1]
        for i, d in enumerate(diffs.values()):
            ax.plot([i] * len(d["per_seed"]), d["per_seed"], "o", color="0.6", ms=4)
            ci = d.get("ci95")
            err = None if ci is None else [[d["mean"] - ci[0]], [ci[1] - d["mean"]]]
            ax.errorbar(i + 0.12, d["mean"], yerr=err, fmt="D", color="#0072B2", capsize=4, ms=6)
        ax.axhline(0.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(diffs)), [f"{a}\n- {summary['baseline']}" for a in diffs])
        ax.set_xlim(-0.5, len(diffs) - 0.5)
        ax.set_ylabel(f"paired difference in test {metric}")
        ax.set_title("against the baseline, same seeds")
    if title:
        fig.suptitle(textwrap.fill(title, 110), fontsize=9)  # long titles wrap, never run off the figure
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(summary: dict, out: Path, title: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    out.with_suffix(".md").write_text(markdown(summary, title))
    figure(summary, out.with_suffix(".png"), title=title)


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a plan's arms x seeds")
    run.add_argument("plan", choices=sorted(PLANS))
    run.add_argument("--out", type=Path, default=None, help="runs/<plan> by default")
    run.add_argument("--data-root", type=Path, default=None,
                     help="folder holding kvasir-seg/ and acdc/ (default: $CONTRASTKIT_DATA)")
    run.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the plan's)")
    run.add_argument("--seeds", type=int, nargs="+", default=None, help="a subset of the plan's seeds")
    run.add_argument("--budget-s", type=float, default=None,
                     help="wall-time budget of each run: it stops, evaluates its best checkpoint and writes metrics")
    run.add_argument("--device", default=None)
    run.add_argument("--dry-run", action="store_true", help="print the commands only")
    summary = sub.add_parser("summarize", help="one table (JSON + Markdown) of a study's runs")
    summary.add_argument("runs", type=Path)
    summary.add_argument("--baseline", default=None, help="the arm paired differences are taken against")
    summary.add_argument("--out", type=Path, required=True, help="writes OUT.json, OUT.md and OUT.png")
    summary.add_argument("--title", default=None)
    args = parser.parse_args(argv)

    if args.command == "summarize":
        result = summarize(args.runs, args.baseline, _facts())
        write_summary(result, args.out, args.title or f"Study {args.runs.name}")
        print(markdown(result, args.title or f"Study {args.runs.name}"))
        return 0

    plan = PLANS[args.plan]
    out = args.out or Path("runs") / args.plan
    root = args.data_root or (Path(os.environ["CONTRASTKIT_DATA"]) if os.environ.get("CONTRASTKIT_DATA") else None)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1; got {args.jobs}")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be positive; got {args.budget_s}")
    try:
        runs = commands(plan, out, root, args.budget_s, args.device, args.seeds)
    except ValueError as error:
        parser.error(str(error))
    if args.dry_run:
        print("\n".join(" ".join(argv) for _, argv in runs))
        return 0
    # The scripts stop at their own budget; the runner's deadline leaves them time to evaluate and write.
    deadline = None if args.budget_s is None else args.budget_s * 1.5 + 120
    done = run_plan(plan, out, args.jobs or plan.jobs, runs, deadline)
    for script, baseline in plan.baseline.items():
        arms = {arm.name for arm in plan.arms if arm.script == script}
        part = out / Path(script).stem
        part.mkdir(exist_ok=True)
        for name in arms:  # one summary per script: link its runs into a folder of their own
            for run_dir in out.glob(f"{name}_s*"):
                link = part / run_dir.name
                if run_dir.is_dir() and not link.exists():
                    link.symlink_to(run_dir.resolve())
        try:
            write_summary(summarize(part, baseline, _facts()), out / f"summary-{Path(script).stem}",
                          f"{plan.description} ({script})")
        except FileNotFoundError as error:
            print(f"no summary for {script}: {error}")
    return 0 if all(code == 0 for _, code, _ in done) else 1


if __name__ == "__main__":
    sys.exit(main())
