"""examples/monai_interop.py: a tiny run trains a MONAI network with contrastkit's losses."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("monai")
pytest.importorskip("tqdm")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "monai_interop.py"


def load():
    spec = importlib.util.spec_from_file_location("monai_interop", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_tiny_run_trains_and_writes_its_metrics(tmp_path):
    result = load().main(["--iterations", "4", "--labeled", "8", "--batch", "2", "--width", "4",
                          "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test_dice"] == pytest.approx(result["test_dice"])
    # (3 x 8 labeled + 40) images, a fifth held out for the test
    assert 0.0 <= saved["test_dice"] <= 1.0 and saved["test_images"] == 64 // 5


@pytest.mark.parametrize("flag, value", [("--image-size", "48"), ("--iterations", "0"), ("--labeled", "-1")])
def test_bad_flags_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit):
        load().parse_args([flag, value])
    assert flag in capsys.readouterr().err
