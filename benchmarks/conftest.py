"""``pytest benchmarks``: options, the session's rows, the comparison tables, and the results files."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from benchmarks.harness import Row, cpu_peaks


def pytest_addoption(parser):
    group = parser.getgroup("contrastkit benchmarks")
    group.addoption("--ck-scale", choices=("quick", "full"), default="quick",
                    help="quick: CPU-sized sweep (minutes on 2 cores); full: the GPU sweep "
                         "(N = M up to 65,536, D in {64, 128, 256}, fp32 and bf16)")
    group.addoption("--ck-device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where to run (auto: cuda when available)")
    group.addoption("--ck-save", action="store_true",
                    help="write benchmarks/results/<device>-<date>.json, .md and .png at the end")


@dataclass
class Session:
    scale: str
    device: str
    rows: list[Row] = field(default_factory=list)
    rates: object = None  # roofline.DeviceRates on a GPU, measured once
    _peaks: dict = field(default_factory=dict)

    last_s: dict = field(default_factory=dict)  # (case, provider, n, d, dtype) -> seconds of a warm call
    facts: dict | None = None  # with --ck-save: device, date, commit, versions (read once at the start)
    partial: Path | None = None  # with --ck-save: every row as soon as it is measured (JSON lines)

    def _append(self, entry: dict) -> None:
        if self.partial is not None:
            with self.partial.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def save_row(self, row: Row) -> None:
        self._append({"row": row.to_json()})

    def cpu_peak(self, case, provider: str, n: int, d: int, dtype: str) -> dict:
        """Peaks of one provider and size; the first request measures the whole case's sweep."""
        key = (case.name, d, dtype)
        if key not in self._peaks:
            from benchmarks.cases import provider_names, unavailable_reason

            jobs = [(p, size) for p in provider_names(case) for size in case.sizes[self.scale]
                    if not unavailable_reason(case, p, size, self.scale, "cpu")]
            self._peaks[key] = cpu_peaks(case.name, jobs, d, dtype)
        return self._peaks[key][(provider, n)]

    def roofline_rates(self):
        if self.rates is None and self.device == "cuda":
            from benchmarks.roofline import measure_rates

            self.rates = measure_rates()
            self._append({"roofline": self.rates.to_json()})
        return self.rates


def _device(config) -> str:
    choice = config.getoption("--ck-device")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--ck-device=cuda but torch sees no CUDA device")
    return choice


def pytest_configure(config):
    if config.getoption("--ck-scale", default=None) is not None:
        config.ck = Session(config.getoption("--ck-scale"), _device(config))
        if config.getoption("--ck-save"):
            from benchmarks.report import partial_path, run_facts

            config.ck.facts = run_facts(config.ck.device, config.ck.scale)
            config.ck.partial = partial_path(config.ck.facts, time.strftime("%H%M%S"))
            config.ck._append({"facts": config.ck.facts})


@pytest.fixture(scope="session")
def ck(request) -> Session:
    return request.config.ck


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "ck", None)
    if session is None or not session.rows:
        return
    from benchmarks.report import evaluate_targets, markdown_tables

    terminalreporter.write_sep("=", "contrastkit comparison (time · extra peak memory)")
    terminalreporter.write_line(markdown_tables(session.rows))
    terminalreporter.write_sep("-", "targets")
    for target in evaluate_targets(session.rows):
        terminalreporter.write_line(f"[{target['status']}] {target['target']}: {target['measured']}")
    if config.getoption("--ck-save"):
        from benchmarks.report import write_results

        rates = session.rates.to_json() if session.rates is not None else None
        stem = write_results(session.facts, session.rows, rates)
        terminalreporter.write_line(f"results written to {stem}.json, .md and .png")
        if session.partial is not None:
            session.partial.unlink(missing_ok=True)  # complete: the rows are in the results files
