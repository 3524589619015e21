"""Every provider of a case computes the same loss and gradient, so the comparison is like for like.

Tiny float64 inputs; "compiled" is checked through the eager dense math it compiles, "triton"
only on a GPU with the kernels.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import CASES, leaf_inputs, provider_names, unavailable_reason
from contrastkit import CrossLevelContrast

SIZES = {"supcon8": 256, "ntxent": 256, "cross_level": 512, "pl_pixel": 512, "pl_prototype": 512}


def _value_and_grads(case, provider, inputs):
    leaves = leaf_inputs(case, inputs)
    loss = provider(leaves)
    loss.backward()
    return loss.detach(), [leaves[k].grad for k in case.grad_inputs]


@pytest.mark.parametrize("case_name", list(CASES))
def test_providers_agree(ck, case_name):
    case = CASES[case_name]
    device = ck.device
    inputs = case.build(SIZES[case_name], 16, torch.float64, torch.device(device), seed=1)
    expected, expected_grads = _value_and_grads(case, case.providers["reference"], inputs)
    assert torch.isfinite(expected) and expected > 0
    checked = []
    for name in provider_names(case):
        if name == "reference" or unavailable_reason(case, name, SIZES[case_name], "quick", device):
            continue
        provider = (lambda x: case.dense(**x)) if name == "compiled" else case.providers[name]
        value, grads = _value_and_grads(case, provider, inputs)
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-9, msg=f"{name} value")
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9, msg=f"{name} gradient")
        checked.append(name)
    assert len(checked) >= 2, f"only {checked} could be compared with the reference"


def test_cross_level_provider_is_the_module():
    case = CASES["cross_level"]
    inputs = case.build(512, 16, torch.float64, torch.device("cpu"), seed=2)
    module_loss = CrossLevelContrast()(inputs["global_map"], inputs["local_rows"])
    torch.testing.assert_close(case.providers["reference"](inputs), module_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(case.providers["torch"](inputs), module_loss, rtol=1e-10, atol=0)
