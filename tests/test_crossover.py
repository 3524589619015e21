"""The timing helper of the benchmarks (``benchmarks/crossover.py``): alternating rounds, and runs of calls
for calls too short to time one by one."""

from __future__ import annotations

import time

from benchmarks.crossover import interleaved_medians


def _sleeper(seconds: float, calls: list):
    def fn():
        calls.append(seconds)
        time.sleep(seconds)

    return fn


def test_short_calls_are_timed_in_runs_and_reported_per_call():
    short, long = [], []
    fns = [_sleeper(0.0005, short), _sleeper(0.004, long)]
    (short_s, long_s), rounds = interleaved_medians(fns, "cpu", budget_s=0.5, min_rounds=3, max_rounds=5,
                                                    sample_s=0.003)
    assert 3 <= rounds <= 5
    # Per call, not per run (a run of the short call takes about sample_s, several times the call).
    assert 0.0005 <= short_s < 0.0025 and 0.004 <= long_s < 0.02
    # The short call ran in runs of several calls (a warm-up run, then one a round); the long one once a round.
    assert len(short) >= 2 + 2 * (rounds + 1)
    assert len(long) == 1 + rounds


def test_without_a_sample_time_every_call_is_one_sample():
    calls = []
    (seconds,), rounds = interleaved_medians([_sleeper(0.001, calls)], "cpu", budget_s=0.01, min_rounds=4,
                                             max_rounds=4)
    assert rounds == 4 and len(calls) == 1 + 4 and seconds >= 0.001
