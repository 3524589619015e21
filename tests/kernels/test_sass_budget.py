"""The instruction budget of the kernels, read from their sm_90 SASS (``benchmarks/sass_budget.py``).

The tool compiles the kernels of a real ``info_nce`` call for sm_90 without a GPU; it runs in a
subprocess because this folder's conftest turns the interpreter on for the test process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "sass_budget.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("sass_budget", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;            /* 0x00000a0000017a02 */
        /*0010*/                   ISETP.GE.AND P0, PT, R2, R3, PT ; /* 0x000000030200720c */
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ; /* 0x0 */
        /*0030*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR6][R8.64] ; /* 0x0 */
        /*0040*/                   MUFU.EX2 R9, R9 ;                 /* 0x0 */
        /*0050*/                   FADD R10, R10, R9 ;               /* 0x0 */
        /*0060*/              @P0 BRA 0x20 ;                         /* 0x0 */
        /*0070*/                   FMUL R4, R4, R4 ;                 /* 0x0 */
        /*0080*/                   MUFU.LG2 R4, R4 ;                 /* 0x0 */
        /*0090*/                   NOP ;                             /* 0x0 */
        /*00a0*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ; /* 0x0 */
        /*00b0*/              @!P1 BRA `(.L_x_3) ;                   /* 0x0 */
        /*00c0*/                   BRA 0x70 ;                        /* 0x0 */
        /*00d0*/                   FADD R1, R1, R1 ;                 /* 0x0 */
        /*00e0*/                   BRA 0xd0 ;                        /* 0x0 */
        /*00f0*/                   EXIT ;                            /* 0x0 */
"""


def test_hot_loops_are_the_backward_branches_around_mma():
    tool = load_tool()
    instructions = tool.parse_sass(SASS)
    assert len(instructions) == 16 and instructions[6].opcode == "BRA"
    loops = tool.hot_loops(instructions)
    # 0x20..0x60 (an HGMMA, an async copy, one MUFU) and 0x70..0xc0 (an HMMA, a MUFU, a NOP not
    # counted); the loop at 0xd0 holds no MMA and is not hot.
    assert [(loop.size, loop.count(tool.MUFU), loop.count(tool.ASYNC)) for loop in loops] == [(5, 1, 1), (5, 1, 0)]


def test_hot_loop_weights_from_the_launch_arguments():
    """Tile loops weigh their share of the tile counts; the positive pass weighs its tiles per logit the
    forward kernel visited (recorded by the forward's launch, which comes first)."""
    import torch

    tool = load_tool()
    forward_logits = {}
    counts = torch.tensor([[2, 1, 1], [0, 0, 4]], dtype=torch.int32)  # clean, positive, masked per program
    args = dict(counts_ptr=counts, BLOCK_N=32, BLOCK_M=16)
    assert tool.hot_loop_weights("info_nce_fwd_kernel", args, forward_logits) == [0.25, 0.125, 0.625]
    assert forward_logits == {"visited": 8 * 32 * 16}
    assert tool.hot_loop_weights("info_nce_bwd_key_kernel", args, forward_logits) == [0.25, 0.125, 0.625]
    # chunks: rows [start, end), key ranges [lo_a, hi_a) and [lo_b, hi_b), exact
    chunks = torch.tensor([[0, 32, 0, 40, 0, 0, 1], [32, 40, 10, 26, 50, 51, 0]], dtype=torch.int32)
    weights = tool.hot_loop_weights("info_nce_fwd_positive_kernel", dict(chunks_ptr=chunks, BLOCK_N=32, BLOCK_M=16),
                                    forward_logits)
    assert weights == [3 * 32 * 16 / (8 * 32 * 16), 2 * 32 * 16 / (8 * 32 * 16)]
    assert tool.hot_loop_weights("gather_rows_kernel", dict(BLOCK=8), forward_logits) is None
    gather = tool.Launch(SimpleNamespace(__name__="gather_rows_kernel"), (), {}, ())
    assert tool.loop_weights(gather, {}, 2, forward_logits) == [1.0, 1.0]  # once per visited tile each


def test_every_kernel_meets_its_budget(tmp_path):
    """The budgets of the issue on sm_90 SASS, at the benchmark's settings (bf16, D = 128, N = M = 32,768):
    "all" forward <= 12, dq / dk / symmetric backward <= 16 instructions per logit, <= 1.5 MUFU ops per
    logit, no spills, asynchronous copies in every hot loop, each_positive, negatives, grouped and
    feature-map variants within 1.5x of "all" (a forward: the forward kernel plus each_positive's
    positive pass)."""
    tool = load_tool()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    jobs = str(min(4, os.cpu_count() or 1))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--jobs", jobs, "--variants",
                           *tool.CHECKED], capture_output=True, text=True, env=env, timeout=900)
    assert (tmp_path / "budget.json").exists(), proc.stderr[-3000:]
    rows = json.loads((tmp_path / "budget.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == set(tool.CHECKED)
    kernels = {r["kernel"] for r in rows}
    assert {"info_nce_fwd_kernel", "info_nce_fwd_positive_kernel", "info_nce_bwd_query_kernel",
            "info_nce_bwd_key_kernel", "info_nce_bwd_symmetric_kernel"} <= kernels
    tile_loops = [r for r in rows if r["kernel"] != "info_nce_fwd_positive_kernel"]
    assert all(r["loops"] and abs(sum(loop["weight"] for loop in r["loops"][:3]) - 1) < 1e-3 for r in tile_loops)
    # each_positive's positive pass visits a few times the positive logits (1/8 of the candidates)
    passes = [r for r in rows if r["kernel"] == "info_nce_fwd_positive_kernel"]
    assert {r["variant"] for r in passes} == {"self_each_positive", "qk_grouped_each_positive"}
    assert all(0.12 <= sum(loop["weight"] for loop in r["loops"]) <= 0.3 for r in passes)
    assert not tool.over_budget(rows), "\n".join(tool.over_budget(rows))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert all((tmp_path / f"{variant}.sass").stat().st_size > 0 for variant in tool.CHECKED)
