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
