"""Where the dense path stops being the faster one: the measurement behind ``DENSE_MAX_LOGITS``.

    python -m benchmarks.crossover                       # CPU, one thread: the table (about 4 minutes on 2 cores)
    python -m benchmarks.crossover --write               # and benchmarks/results/crossover-<device>-<date>.{md,json}
    python -m benchmarks.crossover --device cuda --write --out DIR           # GPU: dense against the kernels
    TRITON_INTERPRET=1 python -m benchmarks.crossover --device cuda --dry-run --out DIR   # the GPU wiring, on a CPU

``backend="auto"`` takes the dense path (``info_nce(..., backend="dense")``) up to
``contrastkit._backends.DENSE_MAX_LOGITS[device]`` logits per call and the chunked path (CPU) or the
Triton kernels (CUDA) above it. This script times both sides, forward + backward, over three shapes
of call, and reports for each the largest logit count at which dense is still the faster:

* ``supcon`` — self-contrast SupCon, ``info_nce(z, labels=y)``, D = 128, 8 classes; N² logits;
* ``blocks`` — paired views in B = 8 equal blocks (per-image negatives), ``info_nce(q, k, groups=8)``,
  D = 128, G rows per block; B·G² logits;
* ``prototype`` — many queries against few keys per block, as prototype mode calls it:
  ``info_nce(q, k, labels=, key_labels=, groups=8)``, Gq pixels per image (a quarter ignored, as
  background is), 8 keys per image (4 classes, own image and pair), D = 32; B·Gq·8 logits.

The crossover of a shape is the largest logit count at which dense is faster, below the first size
from which it is slower at every size measured (a family stops two sizes after that). Dense and the
other side are timed in alternating rounds (median; CPU: ``torch.set_num_threads(1)``; CUDA: wall
time of a synchronised call, host overhead included, since the overhead is what the crossover
trades against). Peak memory above the inputs is measured as the benchmarks measure it
(``benchmarks/harness.py``): on a CPU for both sides at each crossover, as the resident high-water
mark of a fresh subprocess; on a GPU at every size, with ``torch.cuda.max_memory_allocated``.

The chosen constant is not written here: the results file states the measured crossovers, and
``contrastkit/_backends.py`` cites them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.harness import ROOT, _reset_cpu_peak, _status_bytes, cuda_peak, is_oom, release_cuda

RESULTS = Path(__file__).resolve().parent / "results"
BLOCKS = 8  # images per batch in the block and prototype shapes
KEYS_PER_BLOCK = 8  # prototype shape: 4 classes' means of the image and of its pair


# --- peak memory in a fresh subprocess (also used by test_seed_sizes.py) -------------------------

def run_probe(module: str, flag: str, spec: dict, timeout: float, **env) -> tuple[subprocess.CompletedProcess, list]:
    """``python -m <module> <flag> '<spec>'`` in a fresh process (this tree importable, ``env`` added):
    the finished process and the JSON objects it printed, one a line."""
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    proc = subprocess.run([sys.executable, "-m", module, flag, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": path})
    return proc, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def subprocess_peak(module: str, spec: dict, timeout: float = 900) -> dict[str, int | None]:
    """Extra resident peak in bytes of one forward + backward above its inputs, for each side the probe
    runs (None: out of memory), measured by ``python -m <module> --probe '<spec>'`` in a fresh process.

    As in ``benchmarks/harness.py``: the kernel's high-water mark is reset through clear_refs once the
    inputs exist and a warm-up call has run, and big blocks are ``mmap``ed so that freed memory really
    leaves (so one side's allocations never count against the next). A process killed by the kernel's
    out-of-memory killer counts as out of memory for every side it had not reported.
    """
    proc, reports = run_probe(module, "--probe", spec, timeout, MALLOC_MMAP_THRESHOLD_="65536")
    peaks = {}
    for report in reports:
        peaks.update(report)
    if proc.returncode in (-9, 137):
        return {side: peaks.get(side) for side in spec["sides"]}
    if proc.returncode != 0 or set(peaks) != set(spec["sides"]):
        raise RuntimeError(f"memory probe {module} {spec} failed:\n{proc.stderr[-3000:]}")
    return peaks


def probe(steps: dict[str, Callable[[], object]]) -> None:
    """The subprocess's side of :func:`subprocess_peak`: one thread; for each side a warm-up call, the
    high-water mark reset, the measured call; one JSON line per side."""
    torch.set_num_threads(1)
    for side, step in steps.items():
        try:
            step()
            base = _reset_cpu_peak()
            step()
            peak = _status_bytes("VmHWM") - base
        except Exception as error:  # noqa: BLE001 - out of memory is a result, anything else is raised
            if not is_oom(error):
                raise
            peak = None
        print(json.dumps({side: peak}), flush=True)


# --- timing ------------------------------------------------------------------------------------

def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_calls(fn: Callable[[], object], calls: int, device: str) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(fns: list[Callable[[], object]], device: str, budget_s: float, min_rounds: int = 3,
                        max_rounds: int = 15, sample_s: float = 0.0) -> tuple[list[float], int]:
    """Median seconds of one call of each function, timed in alternating rounds (the order reversed
    every other round) so that drift on a shared machine falls on all of them alike. Warm-up calls
    first; as many rounds as fit in ``budget_s`` (within the bounds). With ``sample_s``, a function
    whose call is shorter is timed over runs of calls that take about that long: a sample of one
    sub-millisecond call is mostly timer and scheduler noise."""
    repeats, sample_total = [], 0.0
    for fn in fns:
        seconds = _time_calls(fn, 1, device)  # the warm-up call
        repeat = 1
        if seconds < sample_s:
            # Short: the first call paid for lazy initialisation; size the run on a second one, and
            # warm up over a whole run.
            repeat = math.ceil(sample_s / max(_time_calls(fn, 1, device), 1e-9))
            seconds = _time_calls(fn, repeat, device) / repeat
        repeats.append(repeat)
        sample_total += seconds * repeat
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(sample_total, 1e-6))))
    samples = [[] for _ in fns]
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            samples[i].append(_time_calls(fns[i], repeats[i], device) / repeats[i])
    return [statistics.median(s) for s in samples], rounds


# --- the shapes of call -----------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    name: str
    title: str
    sizes: dict[str, tuple[int, ...]]  # "cpu", "cuda", "dry" -> sizes, ascending
    size_name: str
    make: Callable  # (size, dtype, device, generator) -> (leaves, call(leaves, backend) -> loss)
    logits: Callable[[int], int]  # logits the dense path forms at a size


def _randn(shape, g, dtype, device):
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def _supcon(n, dtype, device, g):
    from contrastkit import info_nce

    labels = torch.randint(0, 8, (n,), generator=g).to(device)
    return [_randn((n, 128), g, dtype, device)], lambda x, backend: info_nce(x[0], labels=labels, backend=backend)


def _blocks(size, dtype, device, g):
    from contrastkit import info_nce

    leaves = [_randn((BLOCKS * size, 128), g, dtype, device) for _ in range(2)]
    return leaves, lambda x, backend: info_nce(x[0], x[1], groups=BLOCKS, temperature=0.07, backend=backend)


def _prototype(size, dtype, device, g):
    from contrastkit import info_nce

    labels = torch.randint(0, 4, (BLOCKS * size,), generator=g)
    labels = torch.where(labels == 0, -1, labels).to(device)  # background: ignored, as prototype mode does
    key_labels = torch.arange(4).repeat(BLOCKS * KEYS_PER_BLOCK // 4).to(device)
    leaves = [_randn((BLOCKS * size, 32), g, dtype, device), _randn((BLOCKS * KEYS_PER_BLOCK, 32), g, dtype, device)]
    return leaves, lambda x, backend: info_nce(x[0], x[1], labels=labels, key_labels=key_labels, groups=BLOCKS,
                                               backend=backend)


# N, G and Gq are multiples of 16: the kernels compile one specialisation for all of them.
FAMILIES = {f.name: f for f in (
    Family("supcon", "self-contrast SupCon, D = 128, 8 classes", {
        "cpu": (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192),
        "cuda": (1024, 2048, 4096, 6144, 8192, 12288, 16384, 24576, 32768),
        "dry": (32, 64)}, "N", _supcon, lambda n: n * n),
    Family("blocks", f"paired views in B = {BLOCKS} blocks of G (groups={BLOCKS}), D = 128", {
        "cpu": (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096),
        "cuda": (128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192),
        "dry": (16, 32)}, "G", _blocks, lambda g: BLOCKS * g * g),
    Family("prototype", f"Gq queries against {KEYS_PER_BLOCK} keys per block, B = {BLOCKS}, labels, D = 32", {
        "cpu": (256, 1024, 4096, 16384, 32768, 65536, 131072, 262144),
        "cuda": (4096, 16384, 65536, 262144, 524288, 1048576, 2097152),
        "dry": (32, 64)}, "Gq", _prototype, lambda gq: BLOCKS * gq * KEYS_PER_BLOCK),
)}


def training_step(family: Family, size: int, dtype: torch.dtype, device: str, backend: str, seed: int = 0):
    """A forward + backward of one shape and size on one backend, fresh leaves every call."""
    inputs, call = family.make(size, dtype, device, torch.Generator().manual_seed(seed))

    def step():
        leaves = [x.detach().requires_grad_() for x in inputs]
        call(leaves, backend).backward()

    return step


# --- the sweep ---------------------------------------------------------------------------------

def other_backend(device: str) -> str:
    return "triton" if device == "cuda" else "torch"


def crossover(rows: list[dict]) -> dict:
    """The crossover of one (shape, dtype) from its rows (ascending sizes)."""
    timed = [r for r in rows if r.get("ratio") is not None]
    if not timed:
        return {"status": "not measured"}
    first_slower = len(timed)
    while first_slower > 0 and timed[first_slower - 1]["ratio"] >= 1:
        first_slower -= 1
    if first_slower == 0:
        return {"status": "dense never faster", "slower_from": timed[0]["logits"]}
    last = timed[first_slower - 1]
    out = {"status": "found" if first_slower < len(timed) else "dense faster throughout",
           "size": last["size"], "logits": last["logits"], "ratio": last["ratio"]}
    if first_slower < len(timed):
        nxt = timed[first_slower]
        out.update(slower_from=nxt["logits"], slower_ratio=nxt["ratio"])
        # where the ratio crosses 1, interpolated in log logits
        t = -math.log(last["ratio"]) / (math.log(nxt["ratio"]) - math.log(last["ratio"]))
        out["interpolated"] = int(math.exp(math.log(last["logits"]) + t * (math.log(nxt["logits"])
                                                                           - math.log(last["logits"]))))
    return out


def sweep(device: str, dtypes: list[str], families: list[str], dry_run: bool, budget_s: float,
          size_budget_s: float, log=print) -> tuple[list[dict], list[dict]]:
    """Rows (one per shape, dtype and size) and crossovers (one per shape and dtype)."""
    tensor_device = "cpu" if dry_run else device
    other = other_backend(device)
    scale = "dry" if dry_run else device
    start = time.perf_counter()
    rows, crossovers = [], []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for name in families:
            family = FAMILIES[name]
            family_rows, slower_in_a_row = [], 0
            for size in family.sizes[scale]:
                row = dict(family=name, size=size, size_name=family.size_name, dtype=dtype_name, device=device,
                           logits=family.logits(size), other=other)
                family_rows.append(row)
                if slower_in_a_row >= 2:
                    row["skipped"] = "dense already slower at the two sizes below"
                    continue
                if time.perf_counter() - start > budget_s:
                    row["skipped"] = f"the run's time budget ({budget_s:.0f} s) is spent"
                    continue
                measure_size(row, family, size, dtype, tensor_device, other, size_budget_s)
                ratio = row.get("ratio")
                slower_in_a_row = slower_in_a_row + 1 if ratio is not None and ratio >= 1 else 0
                log(format_row(row))
            rows += family_rows
            found = crossover(family_rows)
            found.update(family=name, dtype=dtype_name, device=device, other=other)
            if device == "cpu" and found.get("size") is not None:
                found.update(peaks_at_crossover(family, found["size"], dtype_name, other))
                next(r for r in family_rows if r["size"] == found["size"]).update(
                    {k: found[k] for k in ("dense_peak", f"{other}_peak")})
            crossovers.append(found)
            log(format_crossover(found))
    return rows, crossovers


def measure_size(row: dict, family: Family, size: int, dtype, device: str, other: str, budget_s: float) -> None:
    steps = [training_step(family, size, dtype, device, backend) for backend in ("dense", other)]
    try:
        if device == "cuda":
            for backend, step in zip(("dense", other), steps, strict=True):
                step()  # compilation and autotuning stay out of the peak
                row[f"{backend}_peak"] = cuda_peak(step)[0]
        (dense_s, other_s), row["rounds"] = interleaved_medians(steps, device, budget_s,
                                                                min_rounds=3 if device == "cpu" else 5,
                                                                max_rounds=15 if device == "cpu" else 25)
        row.update(dense_ms=dense_s * 1e3, other_ms=other_s * 1e3, ratio=dense_s / other_s)
    except Exception as error:  # noqa: BLE001 - out of memory is a result
        if not is_oom(error):
            raise
        row["oom"] = True
    finally:
        if device == "cuda":
            release_cuda()


def peaks_at_crossover(family: Family, size: int, dtype: str, other: str) -> dict:
    peaks = subprocess_peak("benchmarks.crossover", dict(family=family.name, size=size, dtype=dtype,
                                                         sides=["dense", other]))
    return {f"{backend}_peak": peak for backend, peak in peaks.items()}


# --- output ------------------------------------------------------------------------------------

def _mib(b) -> str:
    return "–" if b is None else (f"{b / 2**20:.2f}" if b < 10 * 2**20 else f"{b / 2**20:.0f}")


def _logits(n) -> str:
    return "–" if n is None else f"2^{math.log2(n):.1f}"


def _count(n) -> str:
    return f"{n:,} ({_logits(n)})"


def format_row(row: dict) -> str:
    head = f"{row['family']:9} {row['dtype']:8} {row['size_name']}={row['size']:<7} {_logits(row['logits']):>7} logits"
    if row.get("skipped"):
        return f"{head}  skipped: {row['skipped']}"
    if row.get("oom"):
        return f"{head}  out of memory"
    return (f"{head}  dense {row['dense_ms']:9.2f} ms  {row['other']} {row['other_ms']:9.2f} ms  "
            f"dense/{row['other']} {row['ratio']:.2f}")


def format_crossover(c: dict) -> str:
    if c.get("logits") is None:
        return f"crossover {c['family']} {c['dtype']}: {c['status']}"
    text = f"crossover {c['family']} {c['dtype']}: dense faster up to {_logits(c['logits'])} logits ({c['ratio']:.2f})"
    if c.get("slower_from"):
        text += (f", slower from {_logits(c['slower_from'])} ({c['slower_ratio']:.2f}); ratio 1 near "
                 f"{_logits(c['interpolated'])}")
    else:
        text += f" ({c['status']})"
    if "dense_peak" in c:
        text += f"; peak there: dense {_mib(c['dense_peak'])} MiB, {c['other']} {_mib(c.get(c['other'] + '_peak'))} MiB"
    return text


def suggested_limit(crossovers: list[dict]) -> int | None:
    """The smallest crossover over the shapes and dtypes, as a power of two: at or below it dense is the
    faster for every shape measured."""
    found = [c for c in crossovers if c.get("logits") is not None and c["status"] == "found"]
    if not found:
        return None
    return 1 << int(math.log2(min(c.get("interpolated", c["logits"]) for c in found)))


def markdown(facts: dict, rows: list[dict], crossovers: list[dict]) -> str:
    other = other_backend(facts["device_type"])
    dry = " (dry run: CPU tensors through Triton's interpreter, tiny sizes)" if facts.get("dry_run") else ""
    lines = [f"# Dense-path crossover — {facts['device']}, {facts['date']}{dry}", "",
             f"- device: {facts['device']} ({facts['device_type']}; torch threads: {facts['torch_threads']})",
             f"- torch {facts['versions']['torch']}, triton {facts['versions']['triton']}, "
             f"python {facts['versions']['python']}",
             f"- commit {facts['commit']}",
             f"- `info_nce(..., backend=\"dense\")` against `backend=\"{other}\"`, forward + backward, median of "
             "alternating rounds; logits: what the dense path forms per call",
             f"- DENSE_MAX_LOGITS[{facts['device_type']!r}] at this commit: {facts.get('dense_max_logits')}"]
    if facts.get("note"):
        lines.append(f"- note: {facts['note']}")
    limit = suggested_limit(crossovers)
    lines += ["", "## Crossovers", "",
              "| shape | dtype | dense faster up to (logits) | ratio there | slower from | ratio | ratio 1 near | "
              f"peak there: dense | peak there: {other} |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in crossovers:
        if c.get("logits") is None:
            lines.append(f"| {c['family']} | {c['dtype']} | {c['status']} | | | | | | |")
            continue
        dense_peak = _mib(c["dense_peak"]) + " MiB" if c.get("dense_peak") is not None else "–"
        other_peak = _mib(c[f"{other}_peak"]) + " MiB" if c.get(f"{other}_peak") is not None else "–"
        lines.append(f"| {c['family']} | {c['dtype']} | {_count(c['logits'])} | {c['ratio']:.2f} | "
                     + (f"{_count(c['slower_from'])} | {c['slower_ratio']:.2f} | {_count(c['interpolated'])}"
                        if c.get("slower_from") else f"({c['status']}) | | ")
                     + f" | {dense_peak} | {other_peak} |")
    if limit is not None:
        lines += ["", f"The smallest crossover over the shapes and dtypes, as a power of two: **{limit:,}** "
                      f"(2^{int(math.log2(limit))}) logits."]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        lines += ["", f"## Times, {dtype}", "",
                  "| shape | size | logits | dense ms | " + other + " ms | dense / " + other
                  + " | dense peak | " + other + " peak |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["dtype"] == dtype):
            size = f"{r['size_name']} = {r['size']:,}"
            if r.get("skipped") or r.get("oom"):
                lines.append(f"| {r['family']} | {size} | {_count(r['logits'])} | "
                             + ("OOM" if r.get("oom") else f"skipped: {r['skipped']}") + " | | | | |")
                continue
            lines.append(f"| {r['family']} | {size} | {_count(r['logits'])} | {r['dense_ms']:.2f} | "
                         f"{r['other_ms']:.2f} | {r['ratio']:.2f} | {_mib(r.get('dense_peak'))} | "
                         f"{_mib(r.get(other + '_peak'))} |")
    return "\n".join(lines) + "\n"


def write(facts: dict, rows: list[dict], crossovers: list[dict], directory: Path) -> Path:
    from benchmarks.report import device_slug

    directory.mkdir(parents=True, exist_ok=True)
    dry = "-dry-run" if facts.get("dry_run") else ""
    stem = directory / f"crossover-{device_slug(facts['device'])}{dry}-{facts['date']}"
    payload = {**facts, "suggested_dense_max_logits": suggested_limit(crossovers), "crossovers": crossovers,
               "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(facts, rows, crossovers))
    return stem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtypes", nargs="+", help="default: float32 on a CPU, bfloat16 and float32 on a GPU")
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--budget-s", type=float, default=270, help="sizes left when this is spent are skipped")
    parser.add_argument("--size-budget-s", type=float, default=None,
                        help="time for the rounds of one size (default 1.5 s on a CPU, 0.5 s on a GPU)")
    parser.add_argument("--write", action="store_true", help="write crossover-<device>-<date>.{md,json}")
    parser.add_argument("--out", type=Path, default=None, help="directory of the results (implies --write; "
                        "default benchmarks/results)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --device cuda: tiny sizes on CPU tensors through Triton's interpreter")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        spec = json.loads(args.probe)
        family, dtype = FAMILIES[spec["family"]], getattr(torch, spec["dtype"])
        probe({backend: training_step(family, spec["size"], dtype, "cpu", backend) for backend in spec["sides"]})
        return 0
    if args.dry_run and (args.device != "cuda" or os.environ.get("TRITON_INTERPRET") != "1"):
        parser.error("--dry-run runs the GPU sweep's wiring through Triton's interpreter: "
                     "--device cuda with TRITON_INTERPRET=1")
    if args.device == "cuda" and not args.dry_run and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    dtypes = args.dtypes or (["bfloat16", "float32"] if args.device == "cuda" else ["float32"])
    size_budget = args.size_budget_s or (1.5 if args.device == "cpu" else 0.5)

    from benchmarks.report import run_facts
    from contrastkit import _backends

    threads = torch.get_num_threads()
    if args.device == "cpu":
        torch.set_num_threads(1)
    try:
        facts = run_facts(args.device if not args.dry_run else "cpu", "crossover")
        facts.update(device_type=args.device, torch_threads=torch.get_num_threads(), dry_run=args.dry_run,
                     dense_max_logits=_backends.DENSE_MAX_LOGITS.get(args.device))
        rows, crossovers = sweep(args.device, dtypes, args.families, args.dry_run, args.budget_s, size_budget)
    finally:
        torch.set_num_threads(threads)
    limit = suggested_limit(crossovers)
    if limit is not None:
        print(f"smallest crossover over the shapes and dtypes, as a power of two: {limit:,} "
              f"(2^{int(math.log2(limit))}) logits; DENSE_MAX_LOGITS[{args.device!r}] is {facts['dense_max_logits']:,}")
    if args.write or args.out:
        stem = write(facts, rows, crossovers, args.out or RESULTS)
        print(f"written: {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
