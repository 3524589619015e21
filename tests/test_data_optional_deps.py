"""`import contrastkit` and the dependency-free parts work without the examples extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys

    BLOCKED = ("PIL", "scipy", "kornia", "tqdm", "nibabel")

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked {name}")
            return None

    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, Block())

    import numpy as np
    import contrastkit
    from contrastkit.data import NiftiVolumes, SegmentationFolder, SyntheticPolyps, make_split
    from contrastkit.metrics import dice, hd95

    assert SyntheticPolyps(2, size=32)[1][1].shape == (1, 32, 32)
    assert len(make_split([str(i) for i in range(10)]).test) == 1
    a = np.eye(4, dtype=bool)
    assert dice(a, a) == 1.0
    for call in (lambda: hd95(a, ~a), lambda: contrastkit.data.PairedAugment()):
        try:
            call()
        except ImportError as err:
            assert "contrastkit[examples]" in str(err), err
        else:
            raise AssertionError("expected ImportError")
    print("ok")
    """
)


def test_core_import_without_optional_packages():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
