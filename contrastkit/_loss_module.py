"""The module form of a loss, declared from its function: one definition of each loss's settings.

A loss's settings are the keyword-only arguments of its function (their names, defaults and
docstring). The module is declared from the function and does not list them again::

    class NTXentLoss(LossModule, TemperatureModule):
        function = staticmethod(nt_xent_loss)
        check_settings = staticmethod(_check_nt_xent_settings)  # the checks the function runs
        per_call = ("queue",)  # keyword-only arguments that are inputs of each call, not settings

- ``__init__`` takes exactly the settings (and ``learnable_temperature`` when the function takes a
  ``temperature``), keyword-only, with the function's defaults; ``inspect.signature(cls)`` shows
  them. An unknown or positional argument is the TypeError a plain signature would raise. (A class
  may name in ``positional`` its first settings that callers already give positionally.)
- The settings are checked at construction by ``check_settings``, the helper the function itself
  calls, and stored in one dict, ``_settings``. Each is also an attribute (``module.reduction``);
  assigning one checks it again.
- ``forward(*inputs, **per_call)`` is the function's call with the stored settings and the module's
  τ: the function's positional inputs, then the ``per_call`` arguments, positionally or by name.
- ``extra_repr`` shows τ and every setting.

Everything that reads the function's signature runs once, when the class is created.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ._temperature import TemperatureModule

_LEARNABLE_TEMPERATURE = inspect.Parameter("learnable_temperature", inspect.Parameter.KEYWORD_ONLY, default=False,
                                           annotation="bool")


class _Setting:
    """One stored setting as a module attribute: read from ``_settings``, checked again when assigned."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, module, owner=None):
        if module is None:
            return self
        return module._settings[self.name]

    def __set__(self, module, value) -> None:
        settings = {**module._settings, self.name: value}
        module._check(settings)
        module._settings = settings


class _ClassSignature:
    """``inspect.signature(cls)``: the constructor's settings. Not seen on instances, whose
    signature stays that of a call."""

    def __get__(self, module, owner):
        if module is not None:
            raise AttributeError("__signature__")
        return owner._init_signature


class LossModule(nn.Module):
    """Base of the loss modules: an ``nn.Module`` declared from its loss function (see the
    module docstring). A loss with a ``temperature`` also derives from :class:`TemperatureModule`,
    which holds τ (fixed, a tensor, or learned)."""

    function: ClassVar[Callable[..., torch.Tensor]]
    check_settings: ClassVar[Callable[..., Any] | None] = None
    per_call: ClassVar[tuple[str, ...]] = ()
    # Leading settings that the constructor also takes positionally, where callers already pass them so.
    positional: ClassVar[tuple[str, ...]] = ()

    # Filled in for each loss when its class is created.
    _defaults: ClassVar[dict[str, Any]]  # every setting, temperature included, with its default
    _inputs: ClassVar[int]  # how many positional inputs the function takes
    _checked: ClassVar[tuple[str, ...]]  # the settings check_settings takes
    _has_temperature: ClassVar[bool]
    _init_signature: ClassVar[inspect.Signature]
    __signature__ = _ClassSignature()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "function" not in cls.__dict__:
            return
        parameters = inspect.signature(cls.function).parameters.values()
        keyword_only = [p for p in parameters if p.kind is p.KEYWORD_ONLY]
        unknown = set(cls.per_call) - {p.name for p in keyword_only}
        if unknown:
            raise TypeError(f"{cls.__name__}.per_call names {sorted(unknown)}, which are not keyword-only "
                            f"arguments of {cls.function.__name__}")
        settings = [p for p in keyword_only if p.name not in cls.per_call]
        if any(p.default is p.empty for p in settings):
            raise TypeError(f"every setting of {cls.function.__name__} needs a default")
        cls._defaults = {p.name: p.default for p in settings}
        cls._has_temperature = "temperature" in cls._defaults
        if cls._has_temperature != issubclass(cls, TemperatureModule):
            raise TypeError(f"{cls.__name__} must derive from TemperatureModule exactly when "
                            f"{cls.function.__name__} takes a temperature")
        cls._inputs = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)
        cls._checked = () if cls.check_settings is None else tuple(inspect.signature(cls.check_settings).parameters)
        if not set(cls._checked) <= set(cls._defaults):
            raise TypeError(f"{cls.__name__}.check_settings takes {sorted(set(cls._checked) - set(cls._defaults))}, "
                            f"which are not settings of {cls.function.__name__}")
        if tuple(cls._defaults)[: len(cls.positional)] != cls.positional:
            raise TypeError(f"{cls.__name__}.positional must be the first settings of {cls.function.__name__}")
        settings = [p.replace(kind=p.POSITIONAL_OR_KEYWORD) if p.name in cls.positional else p for p in settings]
        cls._init_signature = inspect.Signature(settings + [_LEARNABLE_TEMPERATURE] * cls._has_temperature)
        for name in cls._defaults:
            if name != "temperature" and name not in cls.__dict__:
                setattr(cls, name, _Setting(name))

    def __init__(self, *args, **settings):
        name = f"{type(self).__qualname__}.__init__()"
        if len(args) > len(self.positional):
            takes = f"from 1 to {len(self.positional) + 1} positional arguments" if self.positional \
                else "1 positional argument"
            raise TypeError(f"{name} takes {takes} but {len(args) + 1} were given")
        values = dict(self._defaults)
        for key, value in zip(self.positional, args, strict=False):
            if key in settings:
                raise TypeError(f"{name} got multiple values for argument {key!r}")
            values[key] = value
        learnable_temperature = False
        for key, value in settings.items():
            if key in values:
                values[key] = value
            elif key == "learnable_temperature" and self._has_temperature:
                learnable_temperature = value
            else:
                raise TypeError(f"{name} got an unexpected keyword argument {key!r}")
        if self._has_temperature:
            super().__init__(values["temperature"], learnable_temperature)  # TemperatureModule checks τ
        else:
            super().__init__()
        self._check(values)
        self._settings = {key: value for key, value in values.items() if key != "temperature"}

    def _check(self, values: dict[str, Any]) -> None:
        if self.check_settings is not None:
            self.check_settings(**{key: values[key] for key in self._checked})

    def forward(self, *inputs, **per_call):
        if len(inputs) > self._inputs:
            inputs = self._per_call_by_position(inputs, per_call)
        if self._has_temperature:
            return self.function(*inputs, temperature=self.temperature, **self._settings, **per_call)
        return self.function(*inputs, **self._settings, **per_call)

    def _per_call_by_position(self, inputs: tuple, per_call: dict) -> tuple:
        """The positional arguments past the function's inputs, as the per-call arguments they name."""
        extra = inputs[self._inputs:]
        if len(extra) > len(self.per_call):
            raise TypeError(f"{type(self).__qualname__}.forward() takes {self._inputs + len(self.per_call) + 1} "
                            f"positional arguments but {len(inputs) + 1} were given")
        for key, value in zip(self.per_call, extra, strict=False):
            if key in per_call:
                raise TypeError(f"{type(self).__qualname__}.forward() got multiple values for argument {key!r}")
            per_call[key] = value
        return inputs[: self._inputs]

    def extra_repr(self) -> str:
        shown = [self.temperature_repr()] if self._has_temperature else []
        return ", ".join(shown + [f"{key}={value!r}" for key, value in self._settings.items()])
