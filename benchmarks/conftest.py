"""``pytest benchmarks``: options, the collected rows, and the closing comparison table."""

from __future__ import annotations

import pytest

from benchmarks.harness import Row, markdown_table

ROWS: list[Row] = []


def pytest_addoption(parser):
    parser.addoption("--ck-scale", choices=("quick", "full"), default="quick",
                     help="quick: CPU-sized cases (minutes on 2 cores); full: GPU sweep")


@pytest.fixture(scope="session")
def scale(request) -> str:
    return request.config.getoption("--ck-scale")


@pytest.fixture(scope="session")
def rows() -> list[Row]:
    return ROWS


def pytest_terminal_summary(terminalreporter):
    if ROWS:
        terminalreporter.write_sep("=", "contrastkit comparison")
        terminalreporter.write_line(markdown_table(ROWS))
