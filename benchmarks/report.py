"""Results of a benchmark run: device facts, target verdicts, markdown tables, a JSON file and a plot.

``python -m benchmarks.report [pytest options]`` runs ``pytest benchmarks --ck-save`` with the
given options (e.g. ``--ck-scale=full``) and writes ``benchmarks/results/<device>-<date>.json``,
``.md`` and ``.png``. ``python -m benchmarks.report --merge A.json B.json ...`` combines the rows
of several runs on the same device (a full GPU sweep may be run in parts, ``-k supcon8`` etc.)
and writes the three files again from them. While it runs, a ``--ck-save`` run appends each row
to ``<device>-<date>-partial-<time>.jsonl``; a run cut short leaves that file, which ``--merge``
also reads.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.cases import CASES, PROVIDER_ORDER
from benchmarks.harness import ROOT, Row

RESULTS = Path(__file__).resolve().parent / "results"


# --- facts about the run ------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_model()


def device_slug(name: str) -> str:
    name = re.sub(r"\((R|TM)\)|\bCPU\b|@.*$", " ", name)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("triton", "pytorch_metric_learning"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            out[module] = None
    return out


def run_facts(device: str, scale: str) -> dict:
    facts = {
        "device": device_name(device),
        "device_type": device,
        "date": dt.date.today().isoformat(),
        "scale": scale,
        "commit": git_commit(),
        "versions": versions(),
        "cpu_cores_available": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
    }
    if device == "cpu":
        facts["note"] = ("CPU timings on a machine whose cores other processes may share are indicative; "
                         "compare providers through the ratios measured within one run.")
    return facts


# --- targets ------------------------------------------------------------------------------

def find_row(rows, **keys) -> Row | None:
    for row in rows:
        if all(getattr(row, k) == v for k, v in keys.items()):
            return row
    return None


def _verdict(name, holds, measured):
    return {"target": name, "status": "not measured" if holds is None else ("holds" if holds else "missed"),
            "measured": measured}


def evaluate_targets(rows: list[Row]) -> list[dict]:
    """The issue's targets, read off the rows of one run."""
    out = []
    at = dict(case="supcon8", d=128, direction="fwd+bwd")

    name = "CPU, N = M = 8,192, D = 128: torch ≤ 1.2x the dense time and ≤ 10% of its peak memory"
    ref = find_row(rows, provider="reference", n=8192, dtype="float32", device="cpu", **at)
    lean = find_row(rows, provider="torch", n=8192, dtype="float32", device="cpu", **at)
    if ref and lean and ref.status == lean.status == "ok":
        time_ratio, memory_ratio = lean.median_s / ref.median_s, lean.peak_bytes / ref.peak_bytes
        out.append(_verdict(name, time_ratio <= 1.2 and memory_ratio <= 0.10,
                            f"time {time_ratio:.2f}x, memory {memory_ratio:.1%}"))
    else:
        out.append(_verdict(name, None, "no CPU rows at this size"))

    name = ("GPU, N = M = 16,384, D = 128, bf16, SupCon fwd+bwd: triton ≥ 3x faster than reference, "
            "≥ 1.5x faster than compiled, extra memory ≤ 1% of the reference's")
    got = {p: find_row(rows, provider=p, n=16384, dtype="bfloat16", device="cuda", **at)
           for p in ("reference", "compiled", "triton")}
    if all(r is not None and r.status == "ok" for r in got.values()):
        vs_ref = got["reference"].median_s / got["triton"].median_s
        vs_compiled = got["compiled"].median_s / got["triton"].median_s
        memory = got["triton"].peak_bytes / got["reference"].peak_bytes
        out.append(_verdict(name, vs_ref >= 3 and vs_compiled >= 1.5 and memory <= 0.01,
                            f"{vs_ref:.2f}x vs reference, {vs_compiled:.2f}x vs compiled, memory {memory:.2%}"))
    else:
        out.append(_verdict(name, None, "; ".join(f"{p}: {r.status if r else 'no row'}" for p, r in got.items())))

    for dtype in ("bfloat16", "float32"):
        name = f"GPU, N = M = 65,536, D = 128, {dtype}: triton runs where dense runs out of memory, ≥ 50% of roofline"
        ref = find_row(rows, provider="reference", n=65536, dtype=dtype, device="cuda", **at)
        fused = find_row(rows, provider="triton", n=65536, dtype=dtype, device="cuda", **at)
        if ref is None or fused is None or fused.status == "n/a":
            out.append(_verdict(name, None, "no GPU rows at this size"))
            continue
        if fused.status != "ok":
            out.append(_verdict(name, False, f"triton: {fused.status}"))
            continue
        pct = fused.roofline_pct
        dense = "dense OOM" if ref.status == "oom" else f"dense did not run out of memory ({ref.status})"
        holds = ref.status == "oom" and pct is not None and pct >= 50
        out.append(_verdict(name, holds, f"{dense}; triton {fused.median_s * 1e3:.1f} ms = {pct:.0f}% of roofline"))
    return out


# --- tables -------------------------------------------------------------------------------

def _mib(b: int) -> str:
    mib = b / 2**20
    return f"{mib:.2f}" if mib < 10 else f"{mib:.0f}"


def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.0f}"


def cell(row: Row) -> str:
    if row.status in ("oom", "error"):
        return row.status.upper()
    if row.status != "ok":
        return "n/a"
    text = f"{_ms(row.median_s)} ms · {_mib(row.peak_bytes)} MiB"
    if row.roofline_pct is not None:
        text += f" · {row.roofline_pct:.0f}% roofline"
    if row.extra.get("executed_tflops"):
        text += f" · {row.extra['executed_tflops']:.0f} TFLOP/s executed"
    return text


def _groups(rows: list[Row]):
    groups = defaultdict(list)
    for row in rows:
        groups[(row.case, row.d, row.dtype, row.device)].append(row)
    order = list(CASES)
    return sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 99, kv[0][1:]))


def markdown_tables(rows: list[Row]) -> str:
    """One table per (case, D, dtype): providers and passes down, N across; notes for rows not run."""
    parts = []
    for (case, d, dtype, device), group in _groups(rows):
        sizes = sorted({r.n for r in group})
        title = CASES[case].title if case in CASES else case
        parts.append(f"#### {title} — D = {d}, {dtype}, {device}\n")
        parts.append("| provider | pass | " + " | ".join(f"N = {n:,}" for n in sizes) + " |")
        parts.append("|---|---|" + "---:|" * len(sizes))
        notes = {}
        providers = sorted({r.provider for r in group}, key=lambda p: PROVIDER_ORDER.index(p)
                           if p in PROVIDER_ORDER else 99)
        for provider in providers:
            for direction in ("fwd", "fwd+bwd"):
                by_n = {r.n: r for r in group if r.provider == provider and r.direction == direction}
                if not by_n:
                    continue
                for r in by_n.values():
                    if r.status == "n/a":
                        notes.setdefault(provider, r.reason)
                if all(r.status == "n/a" for r in by_n.values()):
                    continue
                cells = [cell(by_n[n]) if n in by_n else "–" for n in sizes]
                parts.append(f"| {provider} | {direction} | " + " | ".join(cells) + " |")
        for provider, reason in notes.items():
            parts.append(f"\n*{provider}*: n/a — {reason}")
        parts.append("")
    return "\n".join(parts)


def markdown_report(facts: dict, rows: list[Row], targets: list[dict], rates: dict | None) -> str:
    v = facts["versions"]
    lines = [
        f"# contrastkit benchmarks — {facts['device']}, {facts['date']}",
        "",
        f"- device: {facts['device']} ({facts['device_type']}; {facts['cpu_cores_available']} CPU cores available, "
        f"{facts['torch_threads']} torch threads)",
        f"- torch {v['torch']}, triton {v['triton']}, pytorch-metric-learning {v['pytorch_metric_learning']}, "
        f"python {v['python']}",
        f"- commit {facts['commit']}, scale `{facts['scale']}`",
        "- time: median of a training forward (inputs require grad) and of forward + backward; memory: extra "
        "peak above the inputs (CPU: resident high-water mark of a fresh subprocess; GPU: "
        "`torch.cuda.max_memory_allocated`)",
    ]
    if facts.get("note"):
        lines.append(f"- note: {facts['note']}")
    if rates:
        lines.append(f"- roofline: bf16 {rates['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, "
                     f"tf32 {rates['tf32_flops_per_s'] / 1e12:.0f} TFLOP/s, "
                     f"exp2 {rates['exp_per_s'] / 1e12:.2f} T/s (measured in this run)")
    lines += ["", "## Targets", "", "| target | status | measured |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['status']} | {t['measured']} |" for t in targets]
    lines += ["", "## Results", "", markdown_tables(rows)]
    return "\n".join(lines)


# --- plot ---------------------------------------------------------------------------------

def plot(rows: list[Row], path: Path, title: str) -> None:
    """Per case: fwd+bwd time and extra peak memory against N, log-log, one line per provider (D = 128)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.direction == "fwd+bwd" and r.d == 128 and r.status == "ok"]
    cases = [c for c in CASES if any(r.case == c for r in shown)]
    if not cases:
        return
    providers = [p for p in PROVIDER_ORDER if any(r.provider == p for r in shown)]
    colours = dict(zip(PROVIDER_ORDER, plt.get_cmap("tab10").colors, strict=False))
    styles = {"float32": "-", "bfloat16": "--"}
    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 3.1 * len(cases)), squeeze=False)
    for i, case in enumerate(cases):
        for provider in providers:
            for dtype, style in styles.items():
                line = sorted((r for r in shown if r.case == case and r.provider == provider and r.dtype == dtype),
                              key=lambda r: r.n)
                if not line:
                    continue
                label = provider if len({r.dtype for r in shown}) == 1 else f"{provider} ({dtype})"
                ns = [r.n for r in line]
                kw = dict(color=colours[provider], linestyle=style, marker="o", markersize=3, label=label)
                axes[i, 0].plot(ns, [r.median_s * 1e3 for r in line], **kw)
                axes[i, 1].plot(ns, [r.peak_bytes / 2**20 for r in line], **kw)
        for ax, what in zip(axes[i], ("fwd+bwd time (ms)", "extra peak memory (MiB)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{case}: {what}", fontsize=9)
            ax.set_xlabel("N = M", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="major", alpha=0.3)
        axes[i, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{title}\nmissing points: out of memory or not run", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- writing ------------------------------------------------------------------------------

def results_stem(facts: dict, directory: Path = RESULTS) -> Path:
    return directory / f"{device_slug(facts['device'])}-{facts['date']}"


def partial_path(facts: dict, started: str, directory: Path = RESULTS) -> Path:
    """Where a --ck-save run appends each row as it is measured (removed when the run completes)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = results_stem(facts, directory)
    return stem.with_name(f"{stem.name}-partial-{started}.jsonl")


def write_results(facts: dict, rows: list[Row], rates: dict | None, directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stem = results_stem(facts, directory)
    targets = evaluate_targets(rows)
    payload = {**facts, "roofline": rates, "targets": targets, "rows": [r.to_json() for r in rows]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown_report(facts, rows, targets, rates) + "\n")
    plot(rows, stem.with_suffix(".png"),
         f"contrastkit — {facts['device']}, torch {facts['versions']['torch']}, {facts['date']}, "
         f"commit {facts['commit'][:10]}")
    return stem


def load(path: Path) -> tuple[dict, list[Row], dict | None]:
    """(facts, rows, roofline rates) of a results .json, or of the .jsonl a cut-short run left."""
    if Path(path).suffix == ".jsonl":
        entries = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        facts = next(e["facts"] for e in entries if "facts" in e)
        rates = next((e["roofline"] for e in entries if "roofline" in e), None)
        return facts, [Row(**e["row"]) for e in entries if "row" in e], rates
    payload = json.loads(Path(path).read_text())
    rows = [Row(**r) for r in payload.pop("rows")]
    payload.pop("targets", None)
    return payload, rows, payload.pop("roofline", None)


def merge(paths: list[str]) -> Path:
    facts, rows, rates = load(Path(paths[0]))
    for path in paths[1:]:
        other, more, other_rates = load(Path(path))
        if other["device"] != facts["device"]:
            raise SystemExit(f"{path} is from {other['device']}, not {facts['device']}")
        rows += more
        rates = rates or other_rates
    return write_results(facts, rows, rates)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--merge"]:
        print(merge(argv[1:]))
        return 0
    import pytest

    return pytest.main([str(Path(__file__).resolve().parent), "--ck-save", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
