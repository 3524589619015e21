"""Where real data sets live: an explicit root, or ``$CONTRASTKIT_DATA``."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "CONTRASTKIT_DATA"
HOW_TO_POINT = (f"pass the folder explicitly (root=..., --data DIR) or set ${ENV_VAR} to the folder that holds "
                "kvasir-seg/, acdc/, ...")


def shared_data_root() -> Path | None:
    """The folder named by ``$CONTRASTKIT_DATA`` (holding ``kvasir-seg/``, ``acdc/``, ...); None when unset.

    The library never guesses a location: pass a root explicitly, or set the variable. A variable
    that names no folder is a configuration error (``FileNotFoundError``), not a silent "no data".
    """
    configured = os.environ.get(ENV_VAR)
    if not configured:
        return None
    path = Path(configured).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"${ENV_VAR} points to {path}, which is not a folder; {HOW_TO_POINT}")
    return path


def is_hidden(path) -> bool:
    """True for a file or folder whose name starts with a dot: ``.DS_Store``, and the macOS ``._<name>``
    AppleDouble copies that archives made on a Mac carry beside every file (they hold Finder metadata, not
    the data, yet match the data's extension). Every reader skips them."""
    return Path(path).name.startswith(".")
