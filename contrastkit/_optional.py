"""Import helpers for the optional dependencies of the ``examples`` extra.

``import contrastkit`` needs only torch, numpy and einops. The data and metrics
modules use Pillow, SciPy, kornia and tqdm, imported on first use through
:func:`require` so a missing package fails with an actionable message.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_PIP_NAMES = {"PIL": "pillow"}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` or raise ImportError naming the ``contrastkit[examples]`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        pip_name = _PIP_NAMES.get(top, top)
        raise ImportError(
            f"{feature} needs the optional package '{pip_name}'; install it with "
            f"`pip install contrastkit[examples]` (or `pip install {pip_name}`)"
        ) from err
