"""The temperature of the loss modules: a fixed number or tensor, or learned in log space."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _validation as v

MIN_LEARNED_TEMPERATURE = 0.01
"""A learned τ is clamped here from below, as CLIP caps its logit scale 1/τ at 100."""


class TemperatureModule(nn.Module):
    """Base of the contrastive loss modules: holds τ and gives it as :attr:`temperature`.

    - a number: fixed;
    - a 0-dim floating tensor: used as given (an ``nn.Parameter`` registers as a parameter of
      the module, so an optimiser over ``module.parameters()`` trains τ itself);
    - ``learnable_temperature=True``: τ = exp(``log_temperature``), a parameter initialised at
      log(temperature) and clamped to τ ≥ 0.01 (the log parametrisation CLIP uses: steps are
      relative, and τ stays positive).
    """

    def __init__(self, temperature: float | torch.Tensor, learnable_temperature: bool = False):
        super().__init__()
        temperature = v.check_temperature(temperature)
        v.check_flag("learnable_temperature", learnable_temperature)
        if isinstance(temperature, torch.Tensor):
            v.check_temperature_value(temperature)
        self._fixed_temperature = None
        if learnable_temperature:
            start = float(temperature)
            self.log_temperature = nn.Parameter(torch.tensor(math.log(max(start, MIN_LEARNED_TEMPERATURE))))
        elif isinstance(temperature, nn.Parameter):
            self.temperature_parameter = temperature
        elif isinstance(temperature, torch.Tensor):
            self.register_buffer("temperature_buffer", temperature.detach().clone())
        else:
            self._fixed_temperature = temperature

    @property
    def learnable_temperature(self) -> bool:
        return hasattr(self, "log_temperature")

    @property
    def temperature(self) -> float | torch.Tensor:
        """τ for this call: a float, or a 0-dim tensor (attached to the graph when learned)."""
        if self._fixed_temperature is not None:
            return self._fixed_temperature
        if self.learnable_temperature:
            return self.log_temperature.clamp(min=math.log(MIN_LEARNED_TEMPERATURE)).exp()
        if hasattr(self, "temperature_parameter"):
            return self.temperature_parameter
        return self.temperature_buffer

    def temperature_repr(self) -> str:
        value = self.temperature
        if isinstance(value, torch.Tensor):
            value = f"{float(value.detach()):.4g}"
        return f"temperature={value}" + (" (learned)" if self.learnable_temperature else "")
