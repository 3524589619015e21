"""info_nce on the CPU: the chunked torch path against the dense reference.

Self-contrast with 4 classes at N = M = 8192, D = 128, forward + backward. The chunked path
must use at most 10% of the reference's extra peak memory and at most 1.3x its time.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import CASES, PROVIDERS, Row, peak_memory

N, D = 8192, 128
MEDIANS: dict[str, float] = {}
PEAKS: dict[str, int] = {}


@pytest.mark.parametrize("provider", ["reference", "torch"])
def test_supcon_forward_backward(benchmark, rows, provider):
    inputs = CASES["supcon4"].build(N, D, torch.float32, torch.device("cpu"))
    run = PROVIDERS[provider]
    benchmark.group = f"info_nce supcon4 N=M={N} D={D} fwd+bwd cpu"
    benchmark.pedantic(run, args=(inputs,), rounds=5, warmup_rounds=1)
    memory = peak_memory("supcon4", provider, N, D)
    MEDIANS[provider] = benchmark.stats.stats.median
    PEAKS[provider] = memory["peak_bytes"]
    benchmark.extra_info["peak_bytes"] = memory["peak_bytes"]
    rows.append(Row("supcon4", provider, N, D, "float32", "cpu", "fwd+bwd", MEDIANS[provider], PEAKS[provider]))


def test_chunked_path_ratios(rows):
    if set(MEDIANS) != {"reference", "torch"}:
        pytest.skip("needs both providers of test_supcon_forward_backward in the same run")
    time_ratio = MEDIANS["torch"] / MEDIANS["reference"]
    memory_ratio = PEAKS["torch"] / PEAKS["reference"]
    print(f"\nchunked/reference: time {time_ratio:.2f}x, extra peak memory {memory_ratio:.1%}")
    assert memory_ratio <= 0.10, f"chunked path uses {memory_ratio:.1%} of the reference's peak memory"
    assert time_ratio <= 1.3, f"chunked path takes {time_ratio:.2f}x the reference's time"
