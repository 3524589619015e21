"""Measure the tile shapes of the InfoNCE kernels on a GPU (feeds ``kernels/info_nce.py::GPU_BLOCKS``).

    python benchmarks/tune_blocks.py --out-dir /tmp/tune          # N = M = 32,768, D in {64, 128, 256}

For every kernel (forward, each_positive's positive pass, symmetric backward, backward dq, backward
dk), padded D and dtype it times each candidate (BLOCK_N, BLOCK_M, num_warps, num_stages) with
``triton.testing.do_bench`` (median) — the forward and the symmetric backward on a SupCon
self-contrast batch (the positive pass: the whole each_positive forward, its forward kernel at
the table's shape), dq and dk on
the same rows as queries against a second set of keys (normalised, 8 classes, denominator
"all") — and checks that the candidate's output equals the first candidate's, so that a fast but
wrong shape cannot win. ``benchmarks/sass_budget.py`` checks a candidate's instructions per logit
and spills without a GPU. Candidates are
compiled first in parallel worker processes (Triton's on-disk cache then serves the timing
process), because compiling dominates otherwise. One JSON line per candidate goes to stdout and
``tune_blocks.jsonl``; the best shape per (kernel, D, dtype) is printed last and written to
``tune_blocks.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time

import torch

SMALL = {64: [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3),
              (64, 128, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
         256: [(128, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2),
               (128, 32, 8, 2), (64, 64, 8, 3)]}
BACKWARD = {64: [(128, 64, 8, 2), (128, 64, 8, 3), (64, 128, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2),
                 (64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 2)],
            256: [(64, 64, 4, 2), (32, 32, 4, 1), (32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2),
                  (64, 64, 8, 2)]}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Most used first: a run cut short still has the settings that matter.
SETTINGS = [(128, "bfloat16"), (64, "bfloat16"), (128, "float32"), (256, "bfloat16"), (64, "float32"),
            (256, "float32")]
POSITIVE = {64: [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 8, 2), (32, 64, 4, 2)],
            256: [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1), (32, 64, 4, 2)]}
KINDS = ("forward", "forward_positive", "backward_symmetric", "backward_query", "backward_key")


def candidates(kind: str, d: int):
    table = {"forward": SMALL, "forward_positive": POSITIVE}.get(kind, BACKWARD)
    return table[64 if d <= 128 else 256]


def make_batch(n: int, d: int, dtype: torch.dtype, seed: int = 0):
    """(rows, labels, keys, key labels): self-contrast uses the first two, queries against keys all."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g).to(dtype).cuda()
    labels = torch.randint(0, 8, (n,), generator=g).cuda()
    k = torch.randn(n, d, generator=g).to(dtype).cuda()
    key_labels = torch.randint(0, 8, (n,), generator=g).cuda()
    return q, labels, k, key_labels


# The kernels' flags (denominator, normalize, ignore_index, self_key_offset), as their op schemas take them.
SUPCON = ("all", True, -1, 0)
SUPCON_EACH_POSITIVE = ("each_positive", True, -1, 0)
QUERY_KEY = ("all", True, -1, None)


def _inputs(batch, symmetric: bool):
    q, labels, k, key_labels = batch
    tau = torch.full((), 0.1, device=q.device)
    return (q, q, labels, labels, None, None, tau) if symmetric else (q, k, labels, key_labels, None, None, tau)


def forward_stats(batch):
    """The forward's outputs for the symmetric backward and for dq / dk."""
    from contrastkit.kernels import info_nce as ops

    return (ops.symmetric_forward_op(*_inputs(batch, True), *SUPCON),
            ops.forward_op(*_inputs(batch, False), *QUERY_KEY))


def run_kind(kind: str, batch, block, stats=None):
    """One call of one kernel with its shape set to ``block``; returns its output(s).

    The backward kernels take the forward's statistics (``stats``), computed once outside the timing.
    """
    from contrastkit.kernels import info_nce as ops

    q = batch[0]
    d_pad = ops.padded_size(q.shape[1])
    table = ops.GPU_BLOCKS[q.element_size()][kind]
    previous = table.get(d_pad)
    table[d_pad] = block
    try:
        if kind == "forward":
            loss, _, lse, *_ = ops.symmetric_forward_op(*_inputs(batch, True), *SUPCON)
            return loss, lse
        if kind == "forward_positive":
            loss, _, _, pos_sigmoid, *_ = ops.symmetric_forward_op(*_inputs(batch, True), *SUPCON_EACH_POSITIVE)
            return loss, pos_sigmoid
        symmetric = kind == "backward_symmetric"
        # The forward's outputs (loss, valid, lse, pos_sigmoid, q_plan, k_plan); the backward takes the last four.
        loss, _, *saved = stats[0] if symmetric else stats[1]
        if symmetric:
            return (ops.symmetric_backward_op(torch.ones_like(loss), *_inputs(batch, True), *saved, True, True,
                                              False, *SUPCON)[0],)
        need_query = kind == "backward_query"
        grads = ops.backward_op(torch.ones_like(loss), *_inputs(batch, False), *saved, need_query, not need_query,
                                False, *QUERY_KEY)
        return (grads[0],) if need_query else (grads[1],)
    finally:
        if previous is None:
            del table[d_pad]
        else:
            table[d_pad] = previous


def _compile_one(job):
    kind, d, dtype_name, block = job
    batch = make_batch(4096, d, DTYPES[dtype_name])  # sizes divisible by 16, as N = 32,768: one specialisation
    start = time.perf_counter()
    try:
        run_kind(kind, batch, block, forward_stats(batch))
        torch.cuda.synchronize()
        return job, time.perf_counter() - start, None
    except Exception as error:  # noqa: BLE001 - a shape that does not compile is a result
        return job, time.perf_counter() - start, f"{type(error).__name__}: {str(error)[:200]}"


def time_setting(n: int, d: int, dtype_name: str, compile_errors: dict):
    """A record per candidate of each kernel at one (D, dtype): median ms and error against the first."""
    from triton.testing import do_bench

    batch = make_batch(n, d, DTYPES[dtype_name], seed=d)
    stats = forward_stats(batch)
    for kind in KINDS:
        baseline = None
        for block in candidates(kind, d):
            record = dict(kind=kind, d=d, dtype=dtype_name, n=n, block=block)
            error = compile_errors.get((kind, d, dtype_name, block))
            if error:
                record["error"] = error
            else:
                out = run_kind(kind, batch, block, stats)
                baseline = out if baseline is None else baseline
                record["rel_error"] = max(rel_error(o, b) for o, b in zip(out, baseline, strict=True))
                record["ms"] = do_bench(lambda b=block, k=kind: run_kind(k, batch, b, stats), warmup=25,
                                        rep=100, return_mode="median")
            yield record


def rel_error(got, want) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--workers", type=int, default=12, help="processes compiling candidates in parallel")
    parser.add_argument("--budget-s", type=float, default=240, help="stop starting new settings after this")
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--settings", nargs="+", metavar="D:DTYPE", help="only these, e.g. 128:float32")
    args = parser.parse_args()
    settings = SETTINGS if not args.settings else [(int(d), t) for d, t in (s.split(":") for s in args.settings)]
    os.makedirs(args.out_dir, exist_ok=True)
    start = time.perf_counter()
    jobs = [(kind, d, dtype_name, block) for d, dtype_name in settings for kind in KINDS
            for block in candidates(kind, d)]
    compile_errors = {}
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for job, _, error in pool.map(_compile_one, jobs):
            if error:
                compile_errors[job] = error
    print(f"compiled {len(jobs)} candidates in {time.perf_counter() - start:.0f} s "
          f"({len(compile_errors)} failed)", flush=True)

    best = {}
    with open(os.path.join(args.out_dir, "tune_blocks.jsonl"), "w") as log:
        for d, dtype_name in settings:
            if time.perf_counter() - start > args.budget_s:
                print(f"budget spent: D={d} {dtype_name} and later settings not timed", flush=True)
                break
            for record in time_setting(args.n, d, dtype_name, compile_errors):
                print(json.dumps(record), flush=True)
                log.write(json.dumps(record) + "\n")
                key = (record["kind"], d, dtype_name)
                if record.get("rel_error", 1.0) < 1e-2 and (key not in best or record["ms"] < best[key]["ms"]):
                    best[key] = record
            torch.cuda.empty_cache()

    lines = [f"# Kernel tile shapes on {torch.cuda.get_device_name()} (N = M = {args.n}, SupCon self-contrast)", "",
             "| kernel | D | dtype | best (BLOCK_N, BLOCK_M, warps, stages) | ms |", "|---|---|---|---|---|"]
    lines += [f"| {k[0]} | {k[1]} | {k[2]} | {tuple(r['block'])} | {r['ms']:.3f} |" for k, r in sorted(best.items())]
    with open(os.path.join(args.out_dir, "tune_blocks.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
