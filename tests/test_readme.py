"""The README's fresh-machine commands are the ones CI runs, and the examples it names exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert match, f"README lacks the {marker} block"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert readme_command("test-command") in ci_lines


def test_main_command_runs_a_script_that_exists():
    command = readme_command("main-command")
    scripts = re.findall(r"(examples/\S+\.py)", command)
    assert scripts and all((ROOT / s).is_file() for s in scripts)
    assert "torch==2.13.0" in command


def test_the_quick_loop_snippet_trains_a_monai_network():
    nets = __import__("pytest").importorskip("monai.networks.nets")
    import torch

    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- quick-loop -->\s*```python\n(.+?)\n```", text, re.S)
    assert match, "README lacks the quick-loop block"
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    labels = (images[:, 0] > 0.5).long()  # binary: background and foreground
    namespace = {"BasicUNet": nets.BasicUNet, "loader": [(images, labels)] * 2}
    exec(compile(match.group(1), "README quick-loop", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["loss"].requires_grad
    contrast = namespace["contrast"](namespace["out"].projection, labels)
    assert contrast.item() > 0  # the binary batch contributes: foreground against background
