"""Per-kernel times of the fused InfoNCE on a GPU: this tree's kernels, and an older tree's beside them.

    python benchmarks/kernel_times.py --out DIR                       # N = 32,768 and 65,536, bf16, D = 128
    python benchmarks/kernel_times.py --out DIR --old-tree PKG        # also PKG's kernels (PKG/contrastkit/kernels)
    TRITON_INTERPRET=1 python benchmarks/kernel_times.py --dry-run --out DIR    # tiny sizes on the CPU

Cases (the benchmark's settings): ``supcon_all`` (self-contrast SupCon, 8 classes, τ = 0.1),
``supcon_each_positive`` (the same with ``denominator="each_positive"``) and ``cross_level``
(queries against keys, paired, negatives within 256-row groups, τ = 0.07). Directions: ``fwd``
(a training forward: the graph is built), ``bwd`` (all gradients, from a kept graph), and for
queries against keys ``bwd_dq`` and ``bwd_dk`` (one side requires grad: one backward kernel each),
``fwd+bwd``. Every time is the median of ``triton.testing.do_bench`` (CUDA events, L2 flushed).

Only the public ``contrastkit.info_nce`` is called, so the same script times any tree: with
``--old-tree`` it runs itself again in a subprocess whose ``PYTHONPATH`` puts that tree's package
first. Kernels are compiled first, in parallel worker processes at N = 4,096 (the same
specialisation as the timed sizes: every size argument divisible by 16), so that Triton's disk
cache serves the timed process. Writes ``kernel_times.json`` and ``kernel_times.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = ("supcon_all", "supcon_each_positive", "cross_level")
PRECOMPILE_N = 4096
DTYPES = ("bfloat16", "float16", "float32")


def make_inputs(case: str, n: int, d: int, dtype, device: str, seed: int = 0):
    """(leaves, info_nce keyword arguments); the leaves are the embeddings that require grad."""
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    if case.startswith("supcon"):
        labels = torch.randint(0, 8, (n,), generator=g).to(device)
        denominator = "each_positive" if case.endswith("each_positive") else "all"
        return [q], dict(labels=labels, temperature=0.1, denominator=denominator)
    k = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    cells = torch.arange(n, device=device)
    images = cells // 256
    return [q, k], dict(labels=cells, key_labels=cells, groups=images, key_groups=images, temperature=0.07)


def _loss(leaves, kwargs):
    from contrastkit import info_nce

    return info_nce(leaves[0], leaves[1] if len(leaves) > 1 else None, backend="triton", **kwargs)


def directions(case: str) -> tuple[str, ...]:
    base = ("fwd", "bwd", "fwd+bwd")
    return base if case.startswith("supcon") else (*base, "bwd_dq", "bwd_dk")


def timed_call(case: str, direction: str, n: int, d: int, dtype, device: str):
    """A function running one direction once (inputs and any kept graph made here, outside it)."""
    import torch

    leaves, kwargs = make_inputs(case, n, d, dtype, device)
    if direction == "bwd_dq":
        leaves[0].requires_grad_(True)
    elif direction == "bwd_dk":
        leaves[1].requires_grad_(True)
    else:
        for leaf in leaves:
            leaf.requires_grad_(True)
    wrt = [leaf for leaf in leaves if leaf.requires_grad]
    if direction == "fwd":
        return lambda: _loss(leaves, kwargs)
    if direction == "fwd+bwd":
        return lambda: torch.autograd.grad(_loss(leaves, kwargs), wrt)
    loss = _loss(leaves, kwargs)
    return lambda: torch.autograd.grad(loss, wrt, retain_graph=True)


def median_ms(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def _precompile_one(job):
    case, direction, d, dtype_name = job
    import torch

    timed_call(case, direction, PRECOMPILE_N, d, getattr(torch, dtype_name), "cuda")()
    torch.cuda.synchronize()
    return job


def precompile(jobs: list, workers: int) -> None:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for _ in pool.imap_unordered(_precompile_one, jobs):
            pass


def measure(sizes, d: int, dtype_name: str, device: str, cases, workers: int, tree: str) -> list[dict]:
    import torch

    jobs = [(case, direction, d, dtype_name) for case in cases for direction in directions(case)]
    if device == "cuda" and workers > 1:
        start = time.perf_counter()
        precompile(jobs, workers)
        print(f"[{tree}] compiled {len(jobs)} configurations in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for n in sizes:
        for case in cases:
            for direction in directions(case):
                row = dict(tree=tree, case=case, n=n, d=d, dtype=dtype_name, direction=direction)
                try:
                    fn = timed_call(case, direction, n, d, getattr(torch, dtype_name), device)
                    fn()  # compile (a cache hit after the precompile) and warm up
                    row["ms"] = median_ms(fn, device)
                except Exception as error:  # noqa: BLE001 - a failure is a result
                    row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def run_old_tree(tree: Path, args) -> list[dict]:
    """This script in a subprocess that imports ``tree``'s contrastkit first."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
    out = Path(args.out) / "kernel_times_old.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tree", "old", "--out-json", str(out),
           "--sizes", *map(str, args.sizes), "--d", str(args.d), "--dtype", args.dtype,
           "--workers", str(args.workers), "--cases", *args.cases] + (["--dry-run"] if args.dry_run else [])
    proc = subprocess.run(cmd, env=env, cwd="/", text=True, capture_output=True, timeout=args.old_timeout)
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", flush=True)
    if not out.exists():
        return [dict(tree="old", error=f"exit {proc.returncode}: {proc.stderr[-500:]}")]
    rows = json.loads(out.read_text())
    out.unlink()
    return rows


def table(rows: list[dict], rates: dict | None) -> str:
    lines = ["| case | N | direction | old ms | new ms | old / new |", "|---|---:|---|---:|---:|---:|"]
    cell = {(r["tree"], r["case"], r["n"], r["direction"]): r for r in rows if "case" in r}
    for (tree, case, n, direction), row in sorted(cell.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if tree != "new":
            continue
        old = cell.get(("old", case, n, direction), {})
        new_ms, old_ms = row.get("ms"), old.get("ms")
        ratio = f"{old_ms / new_ms:.2f}" if new_ms and old_ms else "—"
        lines.append(f"| {case} | {n} | {direction} | {f'{old_ms:.3f}' if old_ms else old.get('error', '—')[:40]} "
                     f"| {f'{new_ms:.3f}' if new_ms else row.get('error', '')[:40]} | {ratio} |")
    if rates:
        lines += ["", f"Ceilings measured in the same run: bf16 {rates['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s "
                      f"(cuBLAS), exp2 {rates['exp_per_s'] / 1e12:.2f} T/s."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="folder for kernel_times.json and kernel_times.md")
    parser.add_argument("--sizes", nargs="+", type=int, default=[32768, 65536])
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--workers", type=int, default=8, help="processes compiling the kernels first")
    parser.add_argument("--old-tree", type=Path, help="a folder holding an older contrastkit (with kernels/)")
    parser.add_argument("--old-timeout", type=float, default=240)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU through the interpreter")
    parser.add_argument("--rates", action="store_true", help="measure the cuBLAS bf16 and exp2 ceilings first")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default="new", help=argparse.SUPPRESS)
    parser.add_argument("--out-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("--dry-run runs the kernels through Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        args.sizes = [size for size in args.sizes if size <= 512] or [96]
        device = "cpu"
    else:
        import torch

        if not torch.cuda.is_available():
            print("kernel_times.py needs a CUDA device (or --dry-run)", file=sys.stderr)
            return 2
        device = "cuda"
    rows = measure(args.sizes, args.d, args.dtype, device, args.cases, args.workers, args.tree)
    if args.worker:
        Path(args.out_json).write_text(json.dumps(rows))
        return 0
    rates = None
    if args.rates and device == "cuda":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks.roofline import measure_rates

        rates = measure_rates().to_json()
        print(json.dumps(dict(rates=rates)), flush=True)
    if args.old_tree is not None:
        if (args.old_tree / "contrastkit" / "kernels").is_dir():
            rows += run_old_tree(args.old_tree.resolve(), args)
        else:
            print(f"no old kernels at {args.old_tree}: the old column stays empty", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_times.json").write_text(json.dumps(dict(rows=rows, rates=rates, device=device), indent=1) + "\n")
    text = table(rows, rates)
    (out / "kernel_times.md").write_text(text + "\n")
    print(text)
    return 1 if any("error" in r for r in rows if r.get("tree") == "new") else 0


if __name__ == "__main__":
    sys.exit(main())
