"""Temperature in the loss modules: fixed, a tensor, or learned in log space; gradients reach it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from contrastkit import (
    CrossLevelContrast,
    GlobalContrast,
    LocalContrast,
    NTXentLoss,
    PatchNCELoss,
    PseudoLabelContrast,
    SupConLoss,
    TemperatureModule,
    info_nce,
    sample_partition_slices,
)


def inputs(name, generator):
    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator)

    if name in ("NTXentLoss",):
        return randn(6, 4), randn(6, 4)
    if name == "SupConLoss":
        return randn(6, 2, 4), torch.tensor([0, 1, 0, 2, 1, 2])
    if name in ("PatchNCELoss", "LocalContrast"):
        return randn(2, 4, 4, 4), randn(2, 4, 4, 4)
    if name == "CrossLevelContrast":
        return randn(2, 4, 2, 2), randn(2, 4, 2, 2)
    if name == "PseudoLabelContrast":
        return randn(2, 4, 4, 4), torch.randint(0, 3, (2, 4, 4), generator=generator)
    volume, partition, _ = sample_partition_slices([6, 5], 2, generator)
    return randn(8, 4), volume.repeat(2), partition.repeat(2), torch.arange(2).repeat_interleave(4)


MODULES = [NTXentLoss, SupConLoss, PatchNCELoss, LocalContrast, CrossLevelContrast, PseudoLabelContrast,
           GlobalContrast]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_every_loss_module_takes_a_tensor_or_learned_temperature(module):
    args = inputs(module.__name__, torch.Generator().manual_seed(0))
    fixed = module(temperature=0.3)(*args)
    torch.testing.assert_close(module(temperature=torch.tensor(0.3, dtype=torch.float64))(*args), fixed)

    learned = module(temperature=0.3, learnable_temperature=True).double()
    assert learned.learnable_temperature and [n for n, _ in learned.named_parameters()] == ["log_temperature"]
    loss = learned(*args)
    torch.testing.assert_close(loss, fixed)
    (grad,) = torch.autograd.grad(loss, learned.log_temperature)
    # d loss / d log tau = tau * d loss / d tau, the latter by central differences on the fixed module
    eps = 1e-6
    numeric = (module(temperature=0.3 + eps)(*args) - module(temperature=0.3 - eps)(*args)) / (2 * eps)
    assert grad.abs() > 1e-4, "this batch's loss should depend on tau"
    torch.testing.assert_close(grad, 0.3 * numeric, rtol=1e-5, atol=1e-8)
    assert "(learned)" in repr(learned)

    parameter = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    as_parameter = module(temperature=parameter)
    assert list(as_parameter.parameters()) == [parameter]
    torch.autograd.grad(as_parameter(*args), parameter)


def test_learned_temperature_is_clamped_and_trains():
    module = SupConLoss(temperature=0.5, learnable_temperature=True)
    assert module.temperature.item() == pytest.approx(0.5)
    with torch.no_grad():
        module.log_temperature.fill_(math.log(1e-4))
    assert module.temperature.item() == pytest.approx(0.01)  # CLIP's cap on 1/tau
    # A few SGD steps on a batch with clear classes lower tau (sharper is better there).
    module = SupConLoss(temperature=1.0, learnable_temperature=True)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    for _ in range(5):
        optimizer.zero_grad()
        module(features, labels).backward()
        optimizer.step()
    assert module.temperature.item() < 1.0


def test_temperature_state_follows_state_dict_and_device():
    module = NTXentLoss(temperature=torch.tensor(0.2))
    assert "temperature_buffer" in module.state_dict()
    learned = NTXentLoss(temperature=0.2, learnable_temperature=True)
    assert "log_temperature" in learned.state_dict()
    assert isinstance(module, TemperatureModule)


def test_bad_temperatures_name_the_argument():
    for bad in (torch.tensor(-0.1), torch.tensor(float("nan")), torch.tensor(0.0)):
        with pytest.raises(ValueError, match="temperature must be positive"):
            SupConLoss(temperature=bad)
    with pytest.raises(ValueError, match="0-dim"):
        SupConLoss(temperature=torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="learnable_temperature"):
        SupConLoss(learnable_temperature="yes")
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.randn(3, 2), labels=torch.tensor([0, 0, 1]), temperature=torch.tensor(-1.0))
