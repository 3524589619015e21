"""Test-wide settings: where the development machine keeps the real data sets.

The library reads real data only from an explicit root or ``$CONTRASTKIT_DATA``. On the
project's development machines the data sit beside the checkout in ``../shared/data``; the
tests point the variable there when it is unset, so the real-data tests run where the data
are and skip with a reason where they are not.
"""

from __future__ import annotations

import os
from pathlib import Path

DEVELOPMENT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

if not os.environ.get("CONTRASTKIT_DATA") and DEVELOPMENT_DATA.is_dir():
    os.environ["CONTRASTKIT_DATA"] = str(DEVELOPMENT_DATA)
