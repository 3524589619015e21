"""The roofline: ideal and executed work (CPU), and the device's rates, measured at the start of a GPU
run (triton rows are reported against them)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.roofline import DeviceRates, bound_seconds, executed_flops, fused_work


def test_ideal_and_executed_work_are_apart():
    n, m, d = 1024, 2048, 128
    flops, exps = fused_work(n, m, d)
    assert flops == 8 * n * m * d and exps == 2 * n * m
    # query/key: forward Q·Kᵀ, dq and dk kernels with their own Q·Kᵀ each
    assert executed_flops(n, m, d, self_contrast=False) == 10 * n * m * d
    # self-contrast: one symmetric backward product pair
    assert executed_flops(n, n, d, self_contrast=True) == 6 * n * n * d
    # each_positive: a positive pass over about the positive logits
    assert executed_flops(n, n, d, self_contrast=True, denominator="each_positive",
                          positive_share=0.125) == (6 + 0.25) * n * n * d
    assert executed_flops(n, m, d, self_contrast=False, visited=0.25) == 2.5 * n * m * d
    # the bound uses the ideal work, never the executed one
    rates = DeviceRates(bf16_flops_per_s=1e15, tf32_flops_per_s=5e14, exp_per_s=1e12)
    assert bound_seconds(rates, n, m, d, "bfloat16") == max(flops / 1e15, exps / 1e12)


def test_device_rates(ck):
    if ck.device != "cuda":
        pytest.skip("the roofline is measured on a CUDA GPU only")
    from benchmarks.roofline import run_exp_chain

    x = torch.rand(1 << 16, device="cuda")
    expected = x.clone()
    for _ in range(4):
        expected = torch.exp2(-expected)
    torch.testing.assert_close(run_exp_chain(x, 4), expected, rtol=1e-5, atol=1e-6)

    rates = ck.roofline_rates()
    print(f"\nbf16 {rates.bf16_flops_per_s / 1e12:.0f} TFLOP/s, tf32 {rates.tf32_flops_per_s / 1e12:.0f} TFLOP/s, "
          f"exp2 {rates.exp_per_s / 1e12:.2f} T/s")
    assert rates.bf16_flops_per_s > rates.tf32_flops_per_s > 0, "bf16 tensor cores should outrun tf32"
    assert rates.exp_per_s > 0
