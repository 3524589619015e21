"""examples/pack_data.py: the packed copies read back through the same data classes."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("h5py")
PIL = pytest.importorskip("PIL.Image")

from test_data_acdc import tiny_acdc  # noqa: E402, F401 - a fixture

from contrastkit.data import ACDCSlices, ACDCVolumes, SegmentationFolder  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "pack_data.py"


@pytest.fixture(scope="module")
def pack():
    spec = importlib.util.spec_from_file_location("pack_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_kvasir_pack_reads_back_identically(pack, tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for sub in ("images", "masks"):
        (src / sub).mkdir(parents=True)
    for i in range(3):
        PIL.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(src / "images" / f"c{i}.jpg")
        mask = np.zeros((20, 24, 3), np.uint8)
        mask[5:12, 3:20] = 255
        mask[12, 3:20] = 120  # a JPEG edge value below the threshold
        PIL.fromarray(mask).save(src / "masks" / f"c{i}.jpg", quality=95)
    assert pack(["kvasir-seg", str(src), str(tmp_path / "out")]) == 0
    before, after = SegmentationFolder(src), SegmentationFolder(tmp_path / "out")
    assert before.ids == after.ids
    for i in range(3):
        (x0, m0), (x1, m1) = before[i], after[i]
        assert torch.equal(x0, x1) and torch.equal(m0, m1)
    facts = json.loads((tmp_path / "out" / "PACKED.json").read_text())
    assert facts["images"] == 3 and facts["bytes"] > 0 and "JPEG" in facts["conversion"]


def test_acdc_pack_reads_back_within_its_quantisation(pack, tiny_acdc, tmp_path):  # noqa: F811
    root, _, order = tiny_acdc
    assert pack(["acdc", str(root), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    for split in ("val", "test"):
        for (n0, x0, y0), (n1, x1, y1) in zip(ACDCVolumes(root, split), ACDCVolumes(out, split), strict=True):
            assert n0 == n1 and np.array_equal(y0, y1)
            assert np.abs(x0 - x1).max() <= 0.5 / 127 + 1e-6
    before, after = ACDCSlices(root, size=16), ACDCSlices(out, size=16)
    assert before.names == after.names == [n for n in order if n]
    for i in range(len(before)):
        (x0, y0), (x1, y1) = before[i], after[i]
        assert torch.equal(y0, y1) and (x0 - x1).abs().max() <= 0.5 / 127 + 1e-6


def test_pack_refuses_a_non_empty_destination(pack, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(SystemExit):
        pack(["acdc", str(tmp_path), str(tmp_path / "out")])
