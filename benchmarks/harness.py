"""Shared pieces of the benchmark suite: cases, providers, peak-memory probes and the results table.

A *case* builds inputs from a size; a *provider* computes the same loss value from them in its
own way. Time is measured by pytest-benchmark in the test process; peak memory is measured in a
fresh subprocess (max RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU) above the inputs,
so that one provider's caches never count against another.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from contrastkit import info_nce


@dataclass(frozen=True)
class Case:
    """A named input recipe: ``build(n, d, dtype, device)`` returns the keyword inputs of the loss."""

    name: str
    build: Callable[..., dict]


def supcon_inputs(n, d, dtype, device, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "query": torch.randn(n, d, generator=g).to(device=device, dtype=dtype),
        "labels": torch.randint(0, classes, (n,), generator=g).to(device),
    }


CASES = {
    "supcon4": Case("supcon4", supcon_inputs),
    "supcon8": Case("supcon8", lambda n, d, dtype, device: supcon_inputs(n, d, dtype, device, classes=8)),
}


def _info_nce_provider(backend):
    def run(inputs, requires_grad=True):
        query = inputs["query"].detach().requires_grad_(requires_grad)
        loss = info_nce(query, labels=inputs["labels"], temperature=0.1, backend=backend)
        if requires_grad:
            loss.backward()
        return loss

    return run


PROVIDERS = {
    "reference": _info_nce_provider("reference"),
    "torch": _info_nce_provider("torch"),
    "triton": _info_nce_provider("triton"),
}


def run_once(case: str, provider: str, n: int, d: int, dtype: str, device: str, backward: bool):
    inputs = CASES[case].build(n, d, getattr(torch, dtype), torch.device(device))
    return PROVIDERS[provider](inputs, requires_grad=backward)


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


def _probe_main(spec: dict) -> dict:
    """Runs in the subprocess: warm up on a tiny size, then one measured call above the inputs."""
    device = spec["device"]
    run_once(spec["case"], spec["provider"], 64, spec["d"], spec["dtype"], device, spec["backward"])
    inputs = CASES[spec["case"]].build(spec["n"], spec["d"], getattr(torch, spec["dtype"]), torch.device(device))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_cpu_peak()
    try:
        PROVIDERS[spec["provider"]](inputs, requires_grad=spec["backward"])
    except torch.OutOfMemoryError:
        return {"peak_bytes": None, "oom": True}
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_bytes("VmHWM") - base
    return {"peak_bytes": int(peak), "oom": False}


def peak_memory(case, provider, n, d, dtype="float32", device="cpu", backward=True, timeout=600) -> dict:
    """Extra peak memory of one call, measured in a fresh process; ``oom`` when it ran out of memory."""
    spec = dict(case=case, provider=provider, n=n, d=d, dtype=dtype, device=device, backward=backward)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.harness", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1],
    )
    if proc.returncode != 0:
        if "OutOfMemoryError" in proc.stderr or proc.returncode in (-9, 137):
            return {"peak_bytes": None, "oom": True}
        raise RuntimeError(f"memory probe failed for {spec}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class Row:
    case: str
    provider: str
    n: int
    d: int
    dtype: str
    device: str
    direction: str
    median_s: float | None
    peak_bytes: int | None
    oom: bool = False
    extra: dict = field(default_factory=dict)


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| case | provider | N | D | dtype | pass | median time (ms) | extra peak memory (MiB) |",
        "|---|---|---:|---:|---|---|---:|---:|",
    ]
    for r in rows:
        time_ms = "OOM" if r.oom else ("–" if r.median_s is None else f"{r.median_s * 1e3:.1f}")
        mem = "OOM" if r.oom else ("–" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f}")
        lines.append(f"| {r.case} | {r.provider} | {r.n} | {r.d} | {r.dtype} | {r.direction} | {time_ms} | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(_probe_main(json.loads(sys.argv[1]))))
