"""Correctness of the fused Triton InfoNCE at full size on a GPU, against float64 on sampled rows.

    python benchmarks/gpu_correctness.py                     # N = M = 65,536, D = 128
    python benchmarks/gpu_correctness.py --n 16384 --blocks 2 --out-dir /tmp/check

For each dtype (bf16, fp16, fp32), denominator and mode it runs the kernels forward and backward
on all N x M pairs, with an upstream gradient that is 1 on a few random contiguous blocks of query
rows and 0 elsewhere (fp16: 1/N, the size ``reduction="mean"`` gives every row, which once
flushed fp16 gradients to zero; its gradient error is then relative to the largest expected
element). Because only those rows carry gradient, a float64 dense computation of just those rows
against all keys gives the exact expected per-row losses and the complete expected gradients of
query and key. Modes:

- ``self``: SupCon self-contrast (key=None) with 5% ignored pixels; a block of rows
  start..start+S is checked with ``self_key_offset=start`` in float64.
- ``qk``: separate queries and keys with labels, groups and ignored keys.

With ``--workers`` > 1 every configuration is compiled first in parallel processes at N = 4,096
(the same specialisation: every size argument divisible by 16); timings then exclude compiling.
``--cpu-dry-run`` (with TRITON_INTERPRET=1 and a small --n) checks the script itself without a GPU.

Writes ``gpu_correctness.json`` and ``gpu_correctness.md`` (device, date, commit, versions,
errors, timings) to ``--out-dir`` and exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

from contrastkit import InfoNCEOptions, info_nce
from contrastkit._options import OpInputs
from contrastkit._reference import dense_rows

# --cpu-dry-run switches this to "cpu" (kernels through TRITON_INTERPRET=1, small N only).
DEVICE = "cuda"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (per-row loss, gradients): tolerance relative to 1 + the largest expected magnitude (fp16's
# gradients: relative to the largest expected magnitude, see UPSTREAM).
TOLERANCES = {"bf16": (2e-4, 3e-2), "fp16": (2e-4, 1e-2), "fp32": (2e-5, 1e-3)}
# Upstream gradient on the checked rows: "one", or "mean" (1/N, the per-row weight of reduction="mean").
UPSTREAM = {"bf16": "one", "fp16": "mean", "fp32": "one"}
PRECOMPILE_N = 4096


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_hash() -> str:
    """SHA-256 of the kernel and core sources: identifies the code even where git metadata is stale
    (a copied working tree can carry an older .git)."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.glob("kernels/*.py"), *root.glob("contrastkit/*.py")]):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def scaled_error(got: torch.Tensor, want: torch.Tensor, relative: bool = False) -> float:
    """Largest error over 1 + the largest expected magnitude (``relative``: over the largest)."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    scale = want.abs().max() if relative else 1.0 + want.abs().max()
    return ((got - want).abs().max() / scale.clamp_min(1e-300)).item()


def make_inputs(mode, n, d, dtype, gen):
    q = torch.randn(n, d, generator=gen).to(dtype).to(DEVICE)
    labels = torch.randint(0, 50, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.05] = -1
    if mode == "self":
        return q, None, dict(labels=labels.to(DEVICE))
    k = torch.randn(n, d, generator=gen).to(dtype).to(DEVICE)
    key_labels = torch.randint(0, 50, (n,), generator=gen)
    key_labels[torch.rand(n, generator=gen) < 0.05] = -1
    groups, key_groups = torch.randint(0, 4, (n,), generator=gen), torch.randint(0, 4, (n,), generator=gen)
    return q, k, dict(labels=labels.to(DEVICE), key_labels=key_labels.to(DEVICE), groups=groups.to(DEVICE),
                      key_groups=key_groups.to(DEVICE))


def check(mode, dtype_name, denominator, n, d, blocks, block_rows, gen, temperature=0.1):
    dtype = DTYPES[dtype_name]
    q, k, ids = make_inputs(mode, n, d, dtype, gen)
    starts = sorted(torch.randperm(n // block_rows, generator=gen)[:blocks].mul(block_rows).tolist())
    upstream = torch.zeros(n, device=DEVICE)
    weight = 1.0 / n if UPSTREAM[dtype_name] == "mean" else 1.0
    for s in starts:
        upstream[s:s + block_rows] = weight

    leaves = [q.requires_grad_(True)] + ([] if k is None else [k.requires_grad_(True)])
    sync()
    t0 = time.perf_counter()
    rows = info_nce(q, k, **ids, temperature=temperature, denominator=denominator, reduction="none",
                    backend="triton")
    grads = torch.autograd.grad((rows * upstream).sum(), leaves)
    sync()
    seconds = time.perf_counter() - t0

    ref_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
    qd, kd = ref_leaves[0], ref_leaves[-1]
    labels, key_labels = ids["labels"], ids.get("key_labels", ids["labels"])
    groups, key_groups = ids.get("groups"), ids.get("key_groups")
    row_err, total = 0.0, 0.0
    for s in starts:
        sl = slice(s, s + block_rows)
        inputs = OpInputs(qd[sl], kd, labels[sl], key_labels, None if groups is None else groups[sl], key_groups,
                          torch.tensor(temperature, dtype=torch.float64, device=qd.device))
        want, _ = dense_rows(inputs, InfoNCEOptions(denominator=denominator,
                                                    self_key_offset=s if mode == "self" else None))
        row_err = max(row_err, scaled_error(rows[sl].detach(), want.detach()))
        total = total + want.sum() * weight
    ref_grads = torch.autograd.grad(total, ref_leaves)
    relative = UPSTREAM[dtype_name] == "mean"
    grad_err = max(scaled_error(g, r, relative) for g, r in zip(grads, ref_grads, strict=True))
    row_tol, grad_tol = TOLERANCES[dtype_name]
    return dict(mode=mode, dtype=dtype_name, denominator=denominator, rows_checked=blocks * block_rows,
                upstream=UPSTREAM[dtype_name], row_error=row_err, grad_error=grad_err, row_tolerance=row_tol,
                grad_tolerance=grad_tol, seconds_fwd_bwd=seconds, passed=row_err <= row_tol and grad_err <= grad_tol)


def _precompile_one(job):
    mode, dtype_name, denominator, d = job
    check(mode, dtype_name, denominator, PRECOMPILE_N, d, 1, 64, torch.Generator().manual_seed(0))
    return job


def precompile(jobs: list, workers: int) -> None:
    """Compile every configuration in parallel processes; Triton's disk cache then serves this one."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for _ in pool.imap_unordered(_precompile_one, jobs):
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=65536, help="queries = keys (default 65536)")
    parser.add_argument("--d", type=int, default=128, help="embedding size (default 128)")
    parser.add_argument("--blocks", type=int, default=4, help="contiguous query blocks checked per run")
    parser.add_argument("--block-rows", type=int, default=64, help="rows per checked block")
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out-dir", default=os.path.join(here, "results"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--workers", type=int, default=1, help="processes compiling every configuration first")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="check the script on the CPU through the Triton interpreter (small --n)")
    args = parser.parse_args()
    global DEVICE
    if args.cpu_dry_run:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_correctness.py needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is checked at full float32 precision
    configurations = [(mode, dtype_name, denominator, args.d) for mode in ("self", "qk") for dtype_name in args.dtypes
                      for denominator in ("all", "each_positive", "negatives")]
    if DEVICE == "cuda" and args.workers > 1:
        start = time.perf_counter()
        precompile(configurations, args.workers)
        print(f"compiled {len(configurations)} configurations in {time.perf_counter() - start:.0f} s", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    results = []
    for mode in ("self", "qk"):
        for dtype_name in args.dtypes:
            for denominator in ("all", "each_positive", "negatives"):
                result = check(mode, dtype_name, denominator, args.n, args.d, args.blocks,
                               args.block_rows, gen)
                results.append(result)
                print(json.dumps(result))
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()

    import triton

    record = dict(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter dry run)",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        commit=commit(), source_sha256=source_hash(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(),
        n=args.n, m=args.n, d=args.d, temperature=0.1, results=results,
        passed=all(r["passed"] for r in results),
    )
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "gpu_correctness.json"), "w") as f:
        json.dump(record, f, indent=2)
    lines = [
        f"# Triton InfoNCE correctness at N = M = {args.n}, D = {args.d}", "",
        f"- device: {record['device']}", f"- date: {record['date']}",
        f"- commit: {record['commit']} (kernel and core sources: sha256 {record['source_sha256']})",
        f"- torch {record['torch']}, triton {record['triton']}", f"- all passed: {record['passed']}", "",
        "| mode | dtype | denominator | rows checked | upstream | row error | grad error | fwd+bwd s | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['mode']} | {r['dtype']} | {r['denominator']} | {r['rows_checked']} | {r['upstream']} "
              f"| {r['row_error']:.2e} | {r['grad_error']:.2e} | {r['seconds_fwd_bwd']:.3f} "
              f"| {'yes' if r['passed'] else 'NO'} |"
              for r in results]
    with open(os.path.join(args.out_dir, "gpu_correctness.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
