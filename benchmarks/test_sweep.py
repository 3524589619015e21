"""The comparison: every provider of every case, at every size of the chosen scale, both passes.

Each test records one row (time and extra peak memory, or OOM, or n/a with the reason); the
conftest prints them as tables at the end and, with ``--ck-save``, writes the results files.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.cases import CASES, get_provider, provider_names, run_provider, sweep, unavailable_reason
from benchmarks.harness import DIRECTIONS, Row, cuda_peak, is_oom, release_cuda, time_cpu, time_cuda
from benchmarks.roofline import executed_flops, percent_of_bound

CPU_BUDGET_S = 0.4  # timed rounds per test on a CPU: as many as fit (3 at least, 15 at most)
SQUARE_CASES = ("supcon8", "ntxent", "cross_level", "pl_pixel")  # N queries against M = N keys
FULL_TILE_CASES = ("supcon8", "ntxent")  # self-contrast "all" without groups or ignored rows


def pytest_generate_tests(metafunc):
    if "spec" not in metafunc.fixturenames:
        return
    scale = metafunc.config.ck.scale
    params = []
    for case, n, d, dtype in sweep(scale):
        for provider in provider_names(case):
            for direction in DIRECTIONS:
                params.append(pytest.param((case.name, n, d, dtype, provider, direction),
                                           id=f"{case.name}-N{n}-D{d}-{dtype}-{provider}-{direction}"))
    metafunc.parametrize("spec", params)


def test_provider(benchmark, ck, spec):
    case_name, n, d, dtype, provider, direction = spec
    case = CASES[case_name]
    if ck.scale == "full" and ck.device == "cpu":
        pytest.skip("--ck-scale=full is sized for a GPU (the dense reference needs ~100 GB at N = 65,536)")
    benchmark.group = f"{case_name} N={n} D={d} {dtype} {direction} {ck.device}"
    row = Row(case_name, provider, n, d, dtype, ck.device, direction)
    ck.rows.append(row)
    reason = unavailable_reason(case, provider, n, ck.scale, ck.device)
    if reason:
        row.status, row.reason = "n/a", reason
        ck.save_row(row)
        pytest.skip(reason)

    try:
        inputs = case.build(n, d, getattr(torch, dtype), torch.device(ck.device))
        run = functools.partial(run_provider, case, get_provider(case, provider, ck.device), inputs,
                                DIRECTIONS[direction])
        if ck.device == "cpu":
            measure_cpu(benchmark, ck, case, provider, row, run)
        else:
            measure_cuda(benchmark, ck, provider, row, run)
        if row.status == "ok" and provider == "triton" and direction == "fwd+bwd" and case_name in SQUARE_CASES:
            row.roofline_pct = percent_of_bound(ck.roofline_rates(), n, n, d, dtype, row.median_s)
            if case_name in FULL_TILE_CASES:  # every tile visited: the executed work is known
                row.extra["executed_tflops"] = executed_flops(n, n, d, self_contrast=True) / row.median_s / 1e12
    finally:
        ck.save_row(row)  # written at once: a run cut short keeps what it measured
    if row.status == "n/a":
        pytest.skip(row.reason)
    benchmark.extra_info.update(status=row.status, peak_bytes=row.peak_bytes, roofline_pct=row.roofline_pct)


def measure_cpu(benchmark, ck, case, provider, row, run):
    # Memory first, in subprocesses: a size that runs out of memory there is not run here.
    peaks = ck.cpu_peak(case, provider, row.n, row.d, row.dtype)
    if peaks.get("oom"):
        row.status = "oom"
        return
    if "na" in peaks:
        row.status, row.reason = "n/a", peaks["na"]
        return
    row.peak_bytes = peaks[row.direction]
    try:
        # The other pass of the same provider and size has warmed it up: skip another warm-up.
        warm = (case.name, provider, row.n, row.d, row.dtype)
        row.median_s, row.rounds = time_cpu(benchmark, run, CPU_BUDGET_S, ck.last_s.get(warm))
        ck.last_s[warm] = row.median_s
    except Exception as error:
        if is_oom(error):
            row.status, row.peak_bytes = "oom", None
        else:
            record_failure(row, provider, error)


def record_failure(row, provider, error):
    """A failed compile of the dense math is a result (n/a); any other failure fails the test,
    and its row says "error" rather than keeping the empty times of a row that never ran."""
    text = f"{type(error).__name__}: {error}"[:300]
    if provider == "compiled":
        row.status, row.reason = "n/a", f"torch.compile failed: {text}"
        return
    row.status, row.reason, row.median_s, row.peak_bytes = "error", text, None, None
    raise error


def measure_cuda(benchmark, ck, provider, row, run):
    try:
        run()  # warm-up: compilation and autotuning stay out of the peak and the times
        row.peak_bytes, seconds = cuda_peak(run)
        row.median_s, row.rounds = time_cuda(benchmark, run, seconds)
    except Exception as error:
        if is_oom(error):
            row.status, row.peak_bytes, row.median_s = "oom", None, None
        else:
            record_failure(row, provider, error)
    finally:
        release_cuda()
