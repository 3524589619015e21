"""The device's roofline rates, measured at the start of a GPU run (triton rows are reported against them)."""

from __future__ import annotations

import pytest
import torch


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
