"""The seed-size table's timing (``benchmarks/test_seed_sizes.py``): short CPU calls are timed in several
fresh processes and the row gives the median ratio with its range."""

from __future__ import annotations

import torch

from benchmarks import test_seed_sizes as seed_sizes


def test_a_short_call_is_timed_in_fresh_processes(monkeypatch):
    calls = []
    real = seed_sizes.subprocess_times
    monkeypatch.setattr(seed_sizes, "subprocess_times", lambda *a: calls.append(a) or real(*a))
    threads = torch.get_num_threads()
    row = seed_sizes.measure(seed_sizes.SEED_CASES["cross_level-8"], "cpu", budget_s=0.05, peaks=False, processes=3)
    assert torch.get_num_threads() == threads
    assert calls == [("cross_level-8", 0.05)] * 2 and row["processes"] == 3
    low, high = row["ratio_range"]
    assert 0 < low <= row["ratio"] <= high
    assert row["contrastkit_ms"] > 0 and row["eager_ms"] > 0 and row["agree"]
    assert "median of 3 processes" in seed_sizes.format_row(row)
    assert "median of 3 processes" in row["target"]["measured"]


def test_a_long_call_is_timed_in_this_process_alone(monkeypatch):
    monkeypatch.setattr(seed_sizes, "SHORT_MS", 0.0)
    monkeypatch.setattr(seed_sizes, "subprocess_times", lambda *a: (_ for _ in ()).throw(AssertionError(a)))
    row = seed_sizes.measure(seed_sizes.SEED_CASES["cross_level-8"], "cpu", budget_s=0.05, peaks=False)
    assert "ratio_range" not in row and "processes" not in row
