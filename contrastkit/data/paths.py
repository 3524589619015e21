"""Where the shared real data sets live on a development machine."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "CONTRASTKIT_DATA"


def shared_data_root() -> Path | None:
    """The folder holding ``kvasir-seg/``, ``acdc/``, ...; None when there is none.

    ``$CONTRASTKIT_DATA`` when set (it must then exist), else ``<repo root>/../shared/data``
    for a source checkout. Data are never stored inside the repository.
    """
    configured = os.environ.get(ENV_VAR)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"${ENV_VAR} points to {path}, which is not a folder")
        return path
    path = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return path if path.is_dir() else None
