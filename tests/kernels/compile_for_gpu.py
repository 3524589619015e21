"""Compile every Triton kernel ahead of time for a CUDA target, without a GPU.

Triton's interpreter (how CI runs the kernels) executes the kernels' Python with numpy and so
misses what only the compiler rejects (non-constexpr globals, type errors in a branch, layouts
tl.dot cannot take). This lowers each kernel down to a cubin with Triton's bundled ptxas,
for each dtype and a set of constexpr flags that reaches every branch, and prints one JSON line
per compile. Run with TRITON_INTERPRET unset:

    python tests/kernels/compile_for_gpu.py [--arch 90] [--block 64] [--d-pad 128] [--jobs 2]
    python tests/kernels/compile_for_gpu.py --table     # the tuned shapes, with their shared memory
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import triton
from contrastkit.kernels import _info_nce_kernels as K
from contrastkit.kernels import _plan_kernels as PK
from contrastkit.kernels import pool as P
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
ROW_POINTERS = ("q_ptr", "k_ptr", "dq_ptr", "dk_ptr", "dx_ptr", "x_ptr", "out_ptr", "grad_out_ptr", "grad_x_ptr")
ID_POINTERS = ("q_label", "k_label", "q_group", "k_group", "self_col", "label", "group")
FIXED_POINTERS = {"perm_ptr": "*i32", "order_ptr": "*i32", "counts_ptr": "*i32", "chunks_ptr": "*i32",
                  "n_chunks_ptr": "*i32", "valid_ptr": "*i32", "n_pos_ptr": "*i32",
                  **{f"{name}_ptr": "*i32" for name in ID_POINTERS}}
# The plan kernels (kernels/_plan_kernels.py) read the sort's int64 permutations and keys and write int32
# plans, tile lists and chunk tables; their other pointers are float32 as above.
SORT_POINTERS = ("perm", "lk", "lv", "gk", "gv")
PLAN_POINTERS = {**{f"{side}{name}_ptr": "*i64" for side in ("", "o_", "q_", "k_") for name in SORT_POINTERS},
                 "plan_ptr": "*i32", "q_plan_ptr": "*i32", "k_plan_ptr": "*i32",
                 "out_valid_ptr": "*i1", "starts_ptr": "*i32", "slots_ptr": "*i32",
                 "table_ptr": "*i32", "q_stats_ptr": "*i32", "k_stats_ptr": "*i32", "order_ptr": "*i32",
                 "counts_ptr": "*i32"}
# Every other pointer is float32: norms, per-row statistics and weights, scales, the temperature.
FLOAT_ARGS = ()

# (DENOM, NORMALIZE, HAS_GROUPS, HAS_SELF, TAU_GRAD): every denominator, each flag both ways.
INFO_NCE_FLAGS = [(0, True, False, True, True), (1, True, True, True, False), (2, False, True, False, True)]
INFO_NCE_KERNELS = {"forward": K.info_nce_fwd_kernel, "forward_positive": K.info_nce_fwd_positive_kernel,
                    "backward_query": K.info_nce_bwd_query_kernel, "backward_key": K.info_nce_bwd_key_kernel,
                    "backward_symmetric": K.info_nce_bwd_symmetric_kernel}


def info_nce_constexprs(dtype, flags, block_n, block_m, d_pad):
    denom, normalize, groups, self_, tau_grad = flags
    return dict(DENOM=denom, NORMALIZE=normalize, HAS_GROUPS=groups, HAS_SELF=self_, TAU_GRAD=tau_grad,
                DOT_PRECISION="tf32x3" if dtype == "float32" else "tf32", UPCAST=False, INTERPRETED=False,
                BLOCK_N=block_n, BLOCK_M=block_m, D_PAD=d_pad)


def signature(fn, dtype: str, constexprs: dict, pointers: dict | None = None) -> ASTSource:
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}  # e.g. TAU_GRAD: backward only
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif pointers is not None:
            sig[name] = pointers.get(name, "*fp32" if name.endswith("_ptr") else "i32")
        elif name in ROW_POINTERS:
            sig[name] = "*" + TRITON_TYPES[dtype]
        elif name in FIXED_POINTERS:
            sig[name] = FIXED_POINTERS[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in constexprs.items()})


def jobs(block: int, d_pad: int, dtypes, kernels):
    """(name, kernel, dtype, constexprs, num_warps, num_stages) of every compile (filtered by name)."""
    for job in _all_jobs(block, d_pad, dtypes):
        if not kernels or job[0] in kernels:
            yield job


def _all_jobs(block, d_pad, dtypes):
    yield from plan_jobs(block)
    for dtype in dtypes:
        for flags in INFO_NCE_FLAGS:
            constexprs = info_nce_constexprs(dtype, flags, block, block, d_pad)
            for kernel in INFO_NCE_KERNELS.values():
                yield kernel.__name__, kernel, dtype, constexprs, 4, 2
        for normalize in (False, True):
            yield ("gather_rows_kernel", K.gather_rows_kernel, dtype, dict(NORMALIZE=normalize, BLOCK=block,
                                                                           D_PAD=d_pad), 4, 1)
            yield ("gather_partials_kernel", K.gather_partials_kernel, dtype,
                   dict(NORMALIZE=normalize, WITH_GRAD=normalize, BLOCK=block, D_PAD=d_pad), 4, 1)
        for normalize in (False, True):
            for kernel in (P.pool_fwd_kernel, P.pool_bwd_kernel):
                yield kernel.__name__, kernel, dtype, dict(NORMALIZE=normalize, C_PAD=d_pad, BLOCK_P=block), 4, 1


def plan_jobs(block: int):
    """The plan kernels, with flags that reach every branch (they take no embeddings: one dtype)."""
    rows_flags = ((True, False, True, True), (False, True, True, False), (False, False, False, True))
    for symmetric, groups, self_, starts in rows_flags:
        yield ("plan_rows_kernel", PK.plan_rows_kernel, "float32",
               dict(SYMMETRIC=symmetric, HAS_GROUPS=groups, HAS_SELF=self_, NEGATIVES=not starts,
                    CHUNK_STARTS=starts, POS_BLOCK=block, BLOCK=128), 4, 1)
    for groups in (False, True):
        yield ("plan_chunks_kernel", PK.plan_chunks_kernel, "float32",
               dict(HAS_GROUPS=groups, POS_BLOCK=block, BLOCK=128), 4, 1)
    schedule_flags = ((False, True, True, True, True), (True, True, True, False, False),
                      (False, False, False, False, False))
    for by_keys, groups, self_, both_valid, spread in schedule_flags:
        yield ("plan_schedule_kernel", PK.plan_schedule_kernel, "float32",
               dict(BLOCK_Q=block, BLOCK_K=2 * block, BY_KEYS=by_keys, HAS_GROUPS=groups, HAS_SELF=self_,
                    BOTH_VALID=both_valid, SPREAD=spread, SPREAD_LIMIT=64.0, TILES=128), 4, 1)
    for each_positive, symmetric in ((True, True), (False, False)):
        yield ("backward_rows_kernel", PK.backward_rows_kernel, "float32",
               dict(EACH_POSITIVE=each_positive, SYMMETRIC=symmetric, BLOCK_N=block, BLOCK_M=2 * block, BLOCK=128),
               4, 1)


PLAN_KERNELS = {"plan_rows_kernel", "plan_chunks_kernel", "plan_schedule_kernel", "backward_rows_kernel"}


def table_jobs():
    """Each tuned GPU shape of kernels/info_nce.py, with the flags that need the most resources.

    A shape listed for several padded sizes is compiled at the largest only: its shared memory
    grows with D_PAD, so that one fitting covers the smaller ones."""
    from contrastkit.kernels.info_nce import GPU_BLOCKS

    for element_size, dtype in ((2, "bfloat16"), (4, "float32")):
        for kind, table in GPU_BLOCKS[element_size].items():
            seen = set()
            for d_pad, (block_n, block_m, warps, stages) in sorted(table.items(), reverse=True):
                if (block_n, block_m, warps, stages) in seen:
                    continue
                seen.add((block_n, block_m, warps, stages))
                constexprs = info_nce_constexprs(dtype, (1, True, True, True, True), block_n, block_m, d_pad)
                yield INFO_NCE_KERNELS[kind].__name__, INFO_NCE_KERNELS[kind], dtype, constexprs, warps, stages


def compile_job(job, arch: int) -> dict:
    """One compile as a JSON-ready record (ok, or the error)."""
    name, kernel, dtype, constexprs, warps, stages = job
    start = time.perf_counter()
    record = dict(kernel=name, dtype=dtype, arch=arch, num_warps=warps, num_stages=stages,
                  flags={k: v for k, v in constexprs.items() if k.isupper()})
    try:
        pointers = PLAN_POINTERS if name in PLAN_KERNELS else None
        compiled = triton.compile(signature(kernel, dtype, constexprs, pointers), target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=warps, num_stages=stages))
        ptx = compiled.asm["ptx"]
        record.update(ok=True, cubin_bytes=len(compiled.asm["cubin"]), shared_bytes=compiled.metadata.shared,
                      wgmma="wgmma.mma_async" in ptx, mma="mma.sync" in ptx)
    except Exception as error:  # noqa: BLE001 - every kernel is tried; failures are reported
        record.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000])
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


_JOBS: list = []


def _compile_index(index_arch):
    index, arch = index_arch
    return compile_job(_JOBS[index], arch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80 or 90")
    parser.add_argument("--block", type=int, default=64, help="BLOCK_N = BLOCK_M (small tiles compile faster)")
    parser.add_argument("--d-pad", type=int, default=128, help="padded embedding size")
    parser.add_argument("--dtypes", nargs="+", choices=TRITON_TYPES, default=list(TRITON_TYPES))
    parser.add_argument("--kernels", nargs="+", default=[], help="only these kernels (by function name)")
    parser.add_argument("--table", action="store_true",
                        help="compile the tuned shapes of GPU_BLOCKS instead (reports their shared memory)")
    parser.add_argument("--jobs", type=int, default=1, help="compiles in parallel (worker processes)")
    args = parser.parse_args()
    _JOBS.extend(table_jobs() if args.table else jobs(args.block, args.d_pad, args.dtypes, args.kernels))
    work = [(index, args.arch) for index in range(len(_JOBS))]
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            records = pool.imap(_compile_index, work)
            failed = sum(not print(json.dumps(r), flush=True) and not r["ok"] for r in records)
    else:
        failed = sum(not print(json.dumps(r), flush=True) and not r["ok"] for r in map(_compile_index, work))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
