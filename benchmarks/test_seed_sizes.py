"""The loss modules at their papers' sizes, against the fastest vectorised eager PyTorch form of each value.

    pytest benchmarks/test_seed_sizes.py                 # the table, printed at the end (also in `pytest benchmarks`)
    python -m benchmarks.test_seed_sizes                 # the same table without pytest
    python -m benchmarks.test_seed_sizes --write         # and benchmarks/results/seed-sizes-<device>-<date>.{md,json}
    python -m benchmarks.test_seed_sizes --device cuda --out DIR        # on a GPU, every size

``pytest benchmarks --ck-save`` (``python -m benchmarks.report``) writes the seed-size files too.

Each row is one forward + backward of a contrastkit call and of its eager form (``benchmarks/seeds.py``;
``test_agreement.py`` checks that they compute the same value and gradient) on the same inputs:

- **time**: median of alternating rounds (CPU: one thread, ``torch.set_num_threads(1)``; GPU: wall time
  of a synchronised call); on a CPU a call under ``SHORT_MS`` is timed so in ``PROCESSES`` fresh processes
  and the row gives the median ratio with its range: between processes such a ratio moves by about ±5%
  (where the tensors land in memory), more than between rounds of one process;
- **device ops and host syncs**: :func:`benchmarks.op_budget.count_ops` of one call;
- **peak memory** above the inputs, as the benchmarks measure it (``benchmarks/harness.py``): on a CPU the
  resident high-water mark of a fresh subprocess, on a GPU ``torch.cuda.max_memory_allocated``.

Pixel mode draws its anchors at random: both sides draw ``anchors_per_class`` per (image, class), so the
same number of anchors and the same work, with their own samplers (contrastkit's, and the eager
``seeds.sample_per_class``); their values are compared on the module's own anchors in ``test_agreement.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks import seeds
from benchmarks.crossover import interleaved_medians, probe, run_probe, subprocess_peak
from benchmarks.harness import cuda_peak, release_cuda
from contrastkit import CrossLevelContrast, PseudoLabelContrast, SupConLoss, info_nce

try:
    from benchmarks.op_budget import count_ops
except ImportError:  # the op counter is younger than this table
    count_ops = None

RESULTS = Path(__file__).resolve().parent / "results"
MAP_CLASSES = 4  # background and three foreground classes
SUPCON_CLASSES = 8
BUDGET_S = 2.0  # time for the alternating rounds of one case (3 rounds at least, MAX_ROUNDS at most)
MAX_ROUNDS = 101
SAMPLE_S = 0.005  # a sub-millisecond call is timed over runs of calls that take about this long
CPU_LARGEST_SUPCON = 8192
SHORT_MS = 5.0  # a CPU call shorter than this is timed in PROCESSES processes
PROCESSES = 5


@dataclass(frozen=True)
class Target:
    text: str
    time_ratio: float  # contrastkit / eager
    memory_ratio: float | None = None  # contrastkit / eager extra peak
    cpu_only: bool = False


@dataclass(frozen=True)
class SeedCase:
    key: str
    loss: str  # the contrastkit call
    size: str
    eager: str  # the eager form
    build: Callable[[str], dict]  # device -> inputs (float32)
    grad: str  # the input that requires grad
    contrastkit: Callable[[dict], torch.Tensor]
    eager_fn: Callable[[dict], torch.Tensor]
    same_value: bool = True  # False where the two draw their own random anchors
    target: Target | None = None
    cpu_skip: str | None = None


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, g, device):
    return torch.randn(shape, generator=g).to(device)


def _cross_level_inputs(batch):
    def build(device):
        g = _generator(batch)
        return {"global_map": _randn((batch, 128, 5, 5), g, device), "local_map": _randn((batch, 128, 5, 5), g, device)}

    return build


def _map_inputs(batch, side):
    def build(device):
        g = _generator(side)
        return {"embeddings": _randn((batch, 32, side, side), g, device),
                "labels": torch.randint(0, MAP_CLASSES, (batch, side, side), generator=g).to(device), "seed": 0}

    return build


def _supcon_inputs(n):
    def build(device):
        g = _generator(n)
        return {"z": _randn((n, 128), g, device),
                "labels": torch.randint(0, SUPCON_CLASSES, (n,), generator=g).to(device)}

    return build


def _draws(x) -> torch.Generator:
    """The anchor sampler's generator, seeded alike for every call (on the inputs' device)."""
    return torch.Generator(device=x["embeddings"].device).manual_seed(x["seed"])


_CROSS_LEVEL = CrossLevelContrast()
_PROTOTYPE = PseudoLabelContrast(mode="prototype", num_classes=MAP_CLASSES)
_PIXEL = PseudoLabelContrast(mode="pixel", anchors_per_class=128, num_classes=MAP_CLASSES)
_SUPCON = SupConLoss()
AT_PAPER_SIZE = "≤ 1.0x the eager form's time"
CHUNKED = Target("≤ 1.2x the dense eager time and ≤ 10% of its extra peak memory (CPU)", 1.2, 0.10, cpu_only=True)
SUPCON_CPU_SKIP = (f"not run above N = {CPU_LARGEST_SUPCON:,} on a CPU: the dense eager form takes about 4x its "
                   "N = 8,192 time and 4 GiB there, too long for `pytest benchmarks`; measured on a GPU")


def _cases():
    for batch in (8, 24):
        yield SeedCase(f"cross_level-{batch}", "CrossLevelContrast()", f"{batch}×128×5×5", "seeds.cross_level_eager",
                       _cross_level_inputs(batch), "global_map",
                       lambda x: _CROSS_LEVEL(x["global_map"], x["local_map"]),
                       lambda x: seeds.cross_level_eager(x["global_map"], x["local_map"]),
                       target=Target(AT_PAPER_SIZE, 1.0))
    for batch, side in ((8, 64), (16, 128)):
        size = f"{batch}×32×{side}×{side}"
        paper = Target(AT_PAPER_SIZE, 1.0) if batch == 8 else None
        yield SeedCase(f"pl_prototype-{batch}x{side}", 'PseudoLabelContrast(mode="prototype", num_classes=4)', size,
                       "seeds.prototype_eager", _map_inputs(batch, side), "embeddings",
                       lambda x: _PROTOTYPE(x["embeddings"], x["labels"]),
                       lambda x: seeds.prototype_eager(x["embeddings"], x["labels"], MAP_CLASSES), target=paper)
        yield SeedCase(f"pl_pixel-{batch}x{side}",
                       'PseudoLabelContrast(mode="pixel", anchors_per_class=128, num_classes=4)', size,
                       "seeds.pixel_eager (own draws)", _map_inputs(batch, side), "embeddings",
                       lambda x: _PIXEL(x["embeddings"], x["labels"], generator=_draws(x)),
                       lambda x: seeds.pixel_eager(x["embeddings"], x["labels"], 128, MAP_CLASSES, _draws(x)),
                       same_value=False, target=paper)
    for n in (4096, 8192, 16384):
        skip = SUPCON_CPU_SKIP if n > CPU_LARGEST_SUPCON else None
        eager = lambda x: seeds.supcon_eager(x["z"], x["labels"], num_classes=SUPCON_CLASSES)  # noqa: E731
        yield SeedCase(f"supcon-{n}", "info_nce(z, labels=y)", f"N = {n:,}, D = 128", "seeds.supcon_eager",
                       _supcon_inputs(n), "z", lambda x: info_nce(x["z"], labels=x["labels"]), eager, cpu_skip=skip)
        yield SeedCase(f"supcon_module-{n}", "SupConLoss()", f"N = {n:,}, D = 128", "seeds.supcon_eager",
                       _supcon_inputs(n), "z", lambda x: _SUPCON(x["z"], x["labels"]), eager, cpu_skip=skip)
        if n == 8192:
            yield SeedCase(f"supcon_chunked-{n}", 'info_nce(z, labels=y, backend="torch")', f"N = {n:,}, D = 128",
                           "seeds.supcon_eager (dense)", _supcon_inputs(n), "z",
                           lambda x: info_nce(x["z"], labels=x["labels"], backend="torch"), eager, target=CHUNKED)


SEED_CASES = {case.key: case for case in _cases()}


# --- measuring -----------------------------------------------------------------------------------

def training_step(case: SeedCase, side: str, inputs: dict) -> Callable[[], torch.Tensor]:
    """One forward + backward of one side on fresh leaves; returns the loss."""
    fn = case.contrastkit if side == "contrastkit" else case.eager_fn

    def step():
        leaves = {**inputs, case.grad: inputs[case.grad].detach().requires_grad_()}
        loss = fn(leaves)
        loss.backward()
        return loss.detach()

    return step


def subprocess_times(key: str, budget_s: float) -> tuple[float, float]:
    """(contrastkit, eager) median seconds of one case's alternating rounds in a fresh process."""
    proc, reports = run_probe("benchmarks.test_seed_sizes", "--time-probe", {"case": key, "budget_s": budget_s}, 600)
    if proc.returncode != 0 or not reports:
        raise RuntimeError(f"timing probe of {key} failed:\n{proc.stderr[-3000:]}")
    return reports[-1]["contrastkit"], reports[-1]["eager"]


def _median_times(steps: list[Callable[[], object]], device: str, budget_s: float) -> tuple[tuple[float, float], int]:
    return interleaved_medians(steps, device, budget_s, max_rounds=MAX_ROUNDS, sample_s=SAMPLE_S)


def _time_probe(key: str, budget_s: float) -> None:
    torch.set_num_threads(1)
    case = SEED_CASES[key]
    inputs = case.build("cpu")
    (ck_s, eager_s), _ = _median_times([training_step(case, side, inputs) for side in ("contrastkit", "eager")],
                                       "cpu", budget_s)
    print(json.dumps({"contrastkit": ck_s, "eager": eager_s}), flush=True)


def measure(case: SeedCase, device: str, budget_s: float = BUDGET_S, peaks: bool = True,
            processes: int = PROCESSES) -> dict:
    """One row of the table: times, ops and syncs, peak memory and the target's verdict."""
    row = dict(case=case.key, loss=case.loss, size=case.size, eager=case.eager, device=device, status="ok")
    if device == "cpu" and case.cpu_skip:
        return {**row, "status": "skipped", "reason": case.cpu_skip}
    inputs = case.build(device)
    values = {}

    def keeping(side):
        step = training_step(case, side, inputs)

        def run():
            values[side] = step()

        return run

    steps = [keeping(side) for side in ("contrastkit", "eager")]
    (ck_s, eager_s), row["rounds"] = _median_times(steps, device, budget_s)
    row.update(contrastkit_ms=ck_s * 1e3, eager_ms=eager_s * 1e3, ratio=ck_s / eager_s)
    if device == "cpu" and processes > 1 and ck_s * 1e3 < SHORT_MS:
        runs = [(ck_s, eager_s)] + [subprocess_times(case.key, budget_s) for _ in range(processes - 1)]
        ratios = sorted(ck / eager for ck, eager in runs)
        row.update(contrastkit_ms=statistics.median(ck for ck, _ in runs) * 1e3,
                   eager_ms=statistics.median(eager for _, eager in runs) * 1e3,
                   ratio=statistics.median(ratios), ratio_range=[ratios[0], ratios[-1]], processes=processes)
    row.update(contrastkit_value=float(values["contrastkit"]), eager_value=float(values["eager"]))
    if case.same_value:
        row["agree"] = abs(row["contrastkit_value"] - row["eager_value"]) <= 1e-4 * abs(row["eager_value"]) + 1e-6
    if count_ops is not None:
        for side, step in zip(("contrastkit", "eager"), steps, strict=True):
            counted = count_ops(step, warmup=False)
            row.update({f"{side}_ops": counted.ops, f"{side}_syncs": counted.syncs})
            if side == "contrastkit":
                row["backends"] = list(counted.backends)
    if peaks and device == "cuda":
        for side, step in zip(("contrastkit", "eager"), steps, strict=True):
            row[f"{side}_peak"] = cuda_peak(step)[0]
            release_cuda()
    elif peaks:
        measured = subprocess_peak("benchmarks.test_seed_sizes", {"case": case.key, "sides": ["contrastkit", "eager"]})
        row.update({f"{side}_peak": peak for side, peak in measured.items()})
    row["target"] = verdict(case, row)
    return row


def verdict(case: SeedCase, row: dict) -> dict | None:
    target = case.target
    if target is None:
        return None
    if target.cpu_only and row["device"] != "cpu":
        return {"target": target.text, "status": "not measured", "measured": "a CPU target"}
    measured = [f"time {row['ratio']:.2f}x" + _spread(row)]
    holds = row["ratio"] <= target.time_ratio
    if target.memory_ratio is not None:
        ck, eager = row.get("contrastkit_peak"), row.get("eager_peak")
        if ck is None or not eager:
            return {"target": target.text, "status": "not measured", "measured": "; ".join(measured)}
        measured.append(f"memory {ck / eager:.1%}")
        holds = holds and ck / eager <= target.memory_ratio
    return {"target": target.text, "status": "met" if holds else "not met", "measured": ", ".join(measured)}


def measure_all(device: str, keys: list[str] | None = None, log=print, **kwargs) -> list[dict]:
    """Rows of the chosen cases (all by default); on a CPU with one thread, restored afterwards."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    rows = []
    try:
        for key in keys or list(SEED_CASES):
            rows.append(measure(SEED_CASES[key], device, **kwargs))
            log(format_row(rows[-1]))
    finally:
        torch.set_num_threads(threads)
    return rows


# --- the table -------------------------------------------------------------------------------------

def _mib(b) -> str:
    return "–" if b is None else (f"{b / 2**20:.2f}" if b < 10 * 2**20 else f"{b / 2**20:.0f}")


def _ms(ms) -> str:
    return f"{ms:.2f}" if ms < 10 else f"{ms:.0f}"


def _ops(row, side) -> str:
    if f"{side}_ops" not in row:
        return "–"
    syncs = row[f"{side}_syncs"]
    return f"{row[side + '_ops']} · {syncs} sync{'' if syncs == 1 else 's'}"


def _spread(row: dict) -> str:
    if "ratio_range" not in row:
        return ""
    low, high = row["ratio_range"]
    return f" (median of {row['processes']} processes, {low:.2f}–{high:.2f})"


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['case']:22} {row['status']}: {row['reason']}"
    target = row.get("target") or {}
    return (f"{row['case']:22} contrastkit {_ms(row['contrastkit_ms']):>6} ms  eager {_ms(row['eager_ms']):>6} ms  "
            f"{row['ratio']:.2f}x{_spread(row)}  ops {_ops(row, 'contrastkit')} / {_ops(row, 'eager')}  peak "
            f"{_mib(row.get('contrastkit_peak'))} / {_mib(row.get('eager_peak'))} MiB"
            + (f"  target {target['status']}" if target else ""))


HEADER = ("| case | contrastkit call | size | eager form | contrastkit ms | eager ms | ratio | "
          "ops · syncs contrastkit | ops · syncs eager | peak contrastkit MiB | peak eager MiB | target |")


def markdown_table(rows: list[dict]) -> str:
    lines = [HEADER, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    notes = []
    for row in rows:
        head = f"| {row['case']} | `{row['loss']}` | {row['size']} | {row['eager']} |"
        if row["status"] != "ok":
            lines.append(head + f" {row['status']} | | | | | | | |")
            notes.append(f"*{row['case']}*: {row['reason']}")
            continue
        target = row.get("target")
        verdict_text = f"{target['status']} ({target['target']}; {target['measured']})" if target else ""
        lines.append(head + f" {_ms(row['contrastkit_ms'])} | {_ms(row['eager_ms'])} | {row['ratio']:.2f}x | "
                     f"{_ops(row, 'contrastkit')} | {_ops(row, 'eager')} | {_mib(row.get('contrastkit_peak'))} | "
                     f"{_mib(row.get('eager_peak'))} | {verdict_text} |")
    if count_ops is None:
        notes.append("ops: `benchmarks.op_budget.count_ops` is not available in this tree")
    return "\n".join(lines + [""] + notes) + "\n"


def targets(rows: list[dict]) -> list[dict]:
    return [{"case": r["case"], **r["target"]} for r in rows if r.get("target")]


def markdown(facts: dict, rows: list[dict]) -> str:
    v = facts["versions"]
    lines = [f"# Loss modules at their papers' sizes against eager PyTorch — {facts['device']}, {facts['date']}", "",
             f"- device: {facts['device']} ({facts['device_type']}; {facts['torch_threads']} torch "
             f"thread{'' if facts['torch_threads'] == 1 else 's'} for the times)",
             f"- torch {v['torch']}, triton {v['triton']}, python {v['python']}",
             f"- commit {facts['commit']}",
             "- each row: forward + backward, inputs requiring grad; time: median of alternating rounds (CPU calls "
             f"under {SHORT_MS:g} ms: in {PROCESSES} fresh processes, the median and range of their ratios); "
             "ops: device ops (host syncs) of one call by `benchmarks.op_budget.count_ops`; peak: extra memory "
             "above the inputs (CPU: resident high-water mark of a fresh subprocess; GPU: "
             "`torch.cuda.max_memory_allocated`)",
             "- eager forms: `benchmarks/seeds.py`, equal in value and gradient to the contrastkit calls "
             "(`benchmarks/test_agreement.py`); pixel mode: each side draws its own 128 anchors per (image, class), "
             "so the same number of anchors"]
    if facts.get("note"):
        lines.append(f"- note: {facts['note']}")
    lines += ["", "## Targets", "", "| case | target | status | measured |", "|---|---|---|---|"]
    lines += [f"| {t['case']} | {t['target']} | {t['status']} | {t['measured']} |" for t in targets(rows)]
    lines += ["", "## Table", "", markdown_table(rows)]
    return "\n".join(lines)


def write(facts: dict, rows: list[dict], directory: Path = RESULTS) -> Path:
    from benchmarks.report import device_slug

    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"seed-sizes-{device_slug(facts['device'])}-{facts['date']}"
    payload = {**facts, "targets": targets(rows), "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(facts, rows))
    return stem


def facts_of(device: str) -> dict:
    from benchmarks.report import run_facts

    facts = run_facts(device, "seed sizes")
    if device == "cpu":
        facts["torch_threads"] = 1
    return facts


# --- pytest ----------------------------------------------------------------------------------------

class _TablePlugin:
    """Prints the seed-size table at the end of the session; with --ck-save, writes its files."""

    def __init__(self, device: str):
        self.device, self.rows = device, []
        self.facts = None

    def pytest_terminal_summary(self, terminalreporter, config):
        if not self.rows:
            return
        terminalreporter.write_sep("=", "loss modules at their papers' sizes against eager PyTorch (fwd+bwd)")
        terminalreporter.write_line(markdown_table(self.rows))
        for target in targets(self.rows):
            terminalreporter.write_line(f"[{target['status']}] {target['case']}: {target['target']}: "
                                        f"{target['measured']}")
        if config.getoption("--ck-save", default=False):
            stem = write(self.facts, self.rows)
            terminalreporter.write_line(f"seed-size results written to {stem}.json and .md")


@pytest.fixture(scope="module")
def seed_table(request, ck):
    plugin = _TablePlugin(ck.device)
    plugin.facts = facts_of(ck.device)  # the commit as the run starts
    request.config.pluginmanager.register(plugin, "contrastkit-seed-sizes")
    return plugin


@pytest.mark.parametrize("key", list(SEED_CASES))
def test_seed_size(seed_table, key):
    rows = measure_all(seed_table.device, [key], log=lambda line: None)
    row = rows[0]
    seed_table.rows.append(row)
    if row["status"] == "skipped":
        pytest.skip(row["reason"])
    assert row["contrastkit_ms"] > 0 and row["eager_ms"] > 0
    if "agree" in row:
        assert row["agree"], f"contrastkit {row['contrastkit_value']} but eager {row['eager_value']}"


# --- script ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("-k", dest="select", nargs="+", help="only the cases whose key contains one of these")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="time for the rounds of one case")
    parser.add_argument("--write", action="store_true", help="write seed-sizes-<device>-<date>.{md,json}")
    parser.add_argument("--out", type=Path, help="directory of the results (implies --write; default "
                        "benchmarks/results)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--time-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_probe:
        spec = json.loads(args.time_probe)
        _time_probe(spec["case"], spec["budget_s"])
        return 0
    if args.probe:
        spec = json.loads(args.probe)
        case = SEED_CASES[spec["case"]]
        inputs = case.build("cpu")
        probe({side: training_step(case, side, inputs) for side in spec["sides"]})
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    keys = [k for k in SEED_CASES if not args.select or any(s in k for s in args.select)]
    facts = facts_of(args.device)
    rows = measure_all(args.device, keys, budget_s=args.budget_s)
    print(markdown_table(rows))
    for target in targets(rows):
        print(f"[{target['status']}] {target['case']}: {target['target']}: {target['measured']}")
    if args.write or args.out:
        stem = write(facts, rows, args.out or RESULTS)
        print(f"written: {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
