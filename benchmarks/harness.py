"""Measuring one provider: median time, extra peak memory, and out-of-memory as a result.

Time is measured by pytest-benchmark in the test process (on a GPU also with
``triton.testing.do_bench``, whose median is the one reported). Peak memory is measured above
the inputs: on a GPU in-process with ``torch.cuda.max_memory_allocated``; on a CPU as the
resident high-water mark of a fresh subprocess per provider, so that one provider's allocations
never count against another and a provider killed for memory is recorded, not fatal.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.cases import CASES, get_provider, run_provider

DIRECTIONS = {"fwd": False, "fwd+bwd": True}
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    case: str
    provider: str
    n: int
    d: int
    dtype: str
    device: str
    direction: str  # "fwd" (a training forward: inputs require grad) or "fwd+bwd"
    status: str = "ok"  # "ok", "oom", "n/a" or "error" (the provider raised; the test fails)
    median_s: float | None = None
    peak_bytes: int | None = None
    reason: str = ""
    rounds: int = 0
    roofline_pct: float | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return "out of memory" in text.lower() or "can't allocate memory" in text


# --- time ------------------------------------------------------------------------------------

def time_cpu(benchmark, fn, budget_s: float, estimate_s: float | None = None) -> tuple[float, int]:
    """Median seconds over 3..15 rounds, as many as fit in about ``budget_s``.

    Without an estimate of one call (from a warm provider), one warm-up call gives it.
    """
    if estimate_s is None:
        start = time.perf_counter()
        fn()  # warm-up: lazy initialisation, and compilation for "compiled"
        estimate_s = time.perf_counter() - start
    estimate = estimate_s
    rounds = int(min(15, max(3, budget_s / max(estimate, 1e-6))))
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: time it ourselves
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return sorted(samples)[rounds // 2], rounds
    return benchmark.stats.stats.median, rounds


SLOW_CALL_S = 0.5  # above this a call is timed 3 times with CUDA events instead of by do_bench


def time_cuda(benchmark, fn, estimate_s: float) -> tuple[float, int]:
    """``do_bench``'s median (CUDA events, L2 flushed); pytest-benchmark records synchronised rounds.

    Slow calls (the dense paths at N = 65,536 take seconds) get one pytest-benchmark round and the
    median of three event-timed calls: do_bench alone would call them a dozen times.
    """
    from triton.testing import do_bench

    def synchronised():
        fn()
        torch.cuda.synchronize()

    if estimate_s > SLOW_CALL_S:
        benchmark.pedantic(synchronised, rounds=1, warmup_rounds=0, iterations=1)
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[1], 3
    benchmark.pedantic(synchronised, rounds=3, warmup_rounds=1, iterations=1)
    return do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3, 3


# --- memory ----------------------------------------------------------------------------------

def cuda_peak(fn) -> tuple[int, float]:
    """Bytes allocated at the peak of one call above what was allocated before it, and the
    call's wall time (an estimate that decides how the call is timed)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, time.perf_counter() - start


def release_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_cpu_peak() -> int:
    """Resets the resident high-water mark and returns the resident size now.

    ru_maxrss would carry the parent's high-water mark across fork and exec, so the probe
    resets the kernel's counter through clear_refs instead.
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_bytes("VmRSS")


def _probe_main(spec: dict) -> None:
    """Subprocess: for each (provider, n) of the spec, one JSON line with the extra peak bytes of
    each pass, or ``oom``, or ``na`` with the reason."""
    case = CASES[spec["case"]]
    dtype, cpu = getattr(torch, spec["dtype"]), torch.device("cpu")
    warm = set()
    for name, n in spec["jobs"]:
        provider = get_provider(case, name, "cpu")
        inputs = case.build(n, spec["d"], dtype, cpu)
        result = {"provider": name, "n": n}
        try:
            if name not in warm or name == "compiled":  # keeps lazy set-up and compilation out of the peak
                run_provider(case, provider, inputs, backward=True)
                warm.add(name)
            for direction, backward in DIRECTIONS.items():
                base = _reset_cpu_peak()
                run_provider(case, provider, inputs, backward)
                result[direction] = _status_bytes("VmHWM") - base
        except Exception as error:  # noqa: BLE001 - recorded, not raised: a row says why
            if is_oom(error):
                result["oom"] = True
            elif name == "compiled":
                result["na"] = f"torch.compile failed: {type(error).__name__}: {error}"[:300]
            else:
                raise
        print(json.dumps(result), flush=True)
        del inputs


def cpu_peaks(case: str, jobs: list[tuple[str, int]], d: int, dtype: str, timeout: float = 1800) -> dict:
    """{(provider, n): peaks} of one case, measured in a subprocess (restarted after a kill).

    Providers run one after another in the subprocess; big blocks are mmap'ed and returned to
    the system when freed, so each measurement starts from a clean slate and is not hidden by
    memory the allocator kept from the one before.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    results: dict[tuple[str, int], dict] = {}
    remaining = list(jobs)
    while remaining:
        spec = dict(case=case, jobs=remaining, d=d, dtype=dtype)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.harness", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                results[(entry["provider"], entry["n"])] = entry
        remaining = [job for job in remaining if tuple(job) not in results]
        if proc.returncode == 0 and not remaining:
            break
        if not remaining or proc.returncode not in (-9, 137):
            raise RuntimeError(f"memory probe failed for {spec}:\n{proc.stderr[-3000:]}")
        results[tuple(remaining.pop(0))] = {"oom": True}  # killed by the kernel's out-of-memory killer
    return results


if __name__ == "__main__":
    _probe_main(json.loads(sys.argv[1]))
