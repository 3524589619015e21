"""The issue's targets, read off the rows of the sweep that ran before in the same session.

CPU (issue 2): at N = M = 8,192, D = 128, SupCon fwd+bwd, the chunked path must take at most
1.3x the dense reference's time and use at most 10% of its extra peak memory. (The results
file also states whether the stricter 1.2x of the benchmark issue holds.) The GPU targets are
asserted only where their rows exist (a full-scale GPU run with the Triton kernels).
"""

from __future__ import annotations

import pytest

from benchmarks.report import find_row

AT = dict(case="supcon8", d=128, direction="fwd+bwd")


def _ok_rows(ck, n, dtype, providers):
    rows = {p: find_row(ck.rows, provider=p, n=n, dtype=dtype, device=ck.device, **AT) for p in providers}
    missing = [p for p, r in rows.items() if r is None or r.status == "n/a"]
    if missing:
        pytest.skip(f"needs the sweep's {', '.join(missing)} rows at N={n}, {dtype} in this session")
    return rows


def test_chunked_path_ratios(ck):
    if ck.device != "cpu":
        pytest.skip("a CPU target")
    rows = _ok_rows(ck, 8192, "float32", ("reference", "torch"))
    assert rows["torch"].status == "ok", f"torch path: {rows['torch'].status} at N=8192"
    if rows["reference"].status == "oom":
        return  # the lean path ran where the dense one could not
    time_ratio = rows["torch"].median_s / rows["reference"].median_s
    memory_ratio = rows["torch"].peak_bytes / rows["reference"].peak_bytes
    print(f"\nchunked/reference: time {time_ratio:.2f}x, extra peak memory {memory_ratio:.1%}")
    assert memory_ratio <= 0.10, f"chunked path uses {memory_ratio:.1%} of the reference's peak memory"
    assert time_ratio <= 1.3, f"chunked path takes {time_ratio:.2f}x the reference's time"


def test_triton_speed_and_memory_at_16k(ck):
    if ck.device != "cuda":
        pytest.skip("a GPU target")
    rows = _ok_rows(ck, 16384, "bfloat16", ("reference", "compiled", "triton"))
    fused = rows["triton"]
    assert fused.status == "ok", f"triton: {fused.status}"
    ref, compiled = rows["reference"], rows["compiled"]
    if ref.status == "ok":
        assert ref.median_s / fused.median_s >= 3, f"triton is {ref.median_s / fused.median_s:.2f}x the reference"
        assert fused.peak_bytes <= 0.01 * ref.peak_bytes, (
            f"triton uses {fused.peak_bytes / ref.peak_bytes:.2%} of the reference's extra memory")
    if compiled.status == "ok":
        speedup = compiled.median_s / fused.median_s
        assert speedup >= 1.5, f"triton is {speedup:.2f}x compiled"


def test_triton_at_64k_runs_near_roofline(ck):
    if ck.device != "cuda":
        pytest.skip("a GPU target")
    rows = _ok_rows(ck, 65536, "bfloat16", ("reference", "triton"))
    fused = rows["triton"]
    assert fused.status == "ok", f"triton: {fused.status} at N=65,536"
    print(f"\ndense reference: {rows['reference'].status}; triton at {fused.roofline_pct:.0f}% of the roofline bound")
    assert fused.roofline_pct >= 50, f"triton runs at {fused.roofline_pct:.0f}% of the roofline bound"
