"""The kernels compile for a real GPU target (sm_90, sm_80), checked without a GPU.

The interpreter tests run the kernels' Python through numpy and cannot see compiler errors;
``compile_for_gpu.py`` lowers every kernel to a cubin with Triton's bundled ptxas. It runs in a
subprocess because this folder's conftest turns the interpreter on for the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).with_name("compile_for_gpu.py")
HOPPER_SHARED_MEMORY = 232448  # bytes per block on sm_90


JOBS = str(min(4, os.cpu_count() or 1))  # compiles are independent: one worker per core


def compile_kernels(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--jobs", JOBS, *args], capture_output=True, text=True,
                          env=env, timeout=900)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failures = [f"{r['kernel']} {r['dtype']} {r['flags']}: {r['error']}" for r in records if not r["ok"]]
    assert not failures, "\n\n".join(failures)
    assert records and proc.returncode == 0, proc.stderr[-3000:]
    return records


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles(arch):
    # Small tiles compile in a fraction of the time; the compiler's checks do not depend on size.
    records = compile_kernels("--arch", str(arch), "--block", "16", "--d-pad", "16")
    kernels = {r["kernel"] for r in records}
    assert {"info_nce_fwd_kernel", "info_nce_bwd_query_kernel", "info_nce_bwd_key_kernel",
            "info_nce_bwd_symmetric_kernel", "gather_rows_kernel", "pool_fwd_kernel", "pool_bwd_kernel",
            "gather_partials_kernel", "plan_rows_kernel", "plan_chunks_kernel", "plan_schedule_kernel",
            "backward_rows_kernel"} <= kernels
    assert {r["dtype"] for r in records} == {"float32", "bfloat16", "float16"}


def test_half_precision_forward_uses_hopper_tensor_cores():
    # At the tile shapes used on a GPU, bf16 logits must come from wgmma, Hopper's matrix instruction.
    records = compile_kernels("--arch", "90", "--block", "64", "--d-pad", "128", "--dtypes", "bfloat16",
                              "--kernels", "info_nce_fwd_kernel")
    assert all(r["wgmma"] for r in records), [(r["flags"], r["wgmma"], r["mma"]) for r in records]


def test_tuned_shapes_fit_hopper_shared_memory():
    # Each shape in GPU_BLOCKS, compiled with the flags that need the most, must launch on an
    # H100 (227 KiB of shared memory per block); smaller GPUs shrink shapes at launch instead.
    records = compile_kernels("--arch", "90", "--table")
    too_big = [(r["kernel"], r["dtype"], r["flags"]["D_PAD"], r["shared_bytes"]) for r in records
               if r["shared_bytes"] > HOPPER_SHARED_MEMORY]
    assert not too_big, too_big
    from contrastkit.kernels.info_nce import GPU_BLOCKS

    # Every tuned shape was compiled at its padded size or a larger one (which needs more memory).
    compiled = {(r["kernel"], r["dtype"], r["flags"]["BLOCK_N"], r["flags"]["BLOCK_M"], r["num_warps"],
                 r["num_stages"], r["flags"]["D_PAD"]) for r in records}
    kernels = {"forward": "info_nce_fwd_kernel", "forward_positive": "info_nce_fwd_positive_kernel",
               "backward_query": "info_nce_bwd_query_kernel", "backward_key": "info_nce_bwd_key_kernel",
               "backward_symmetric": "info_nce_bwd_symmetric_kernel"}
    for element_size, dtype in ((2, "bfloat16"), (4, "float32")):
        for kind, table in GPU_BLOCKS[element_size].items():
            for d_pad, shape in table.items():
                assert any(c[:6] == (kernels[kind], dtype, *shape) and c[6] >= d_pad for c in compiled), (kind, d_pad)
