"""Python interpreter steps per call: the host time around the ops, counted rather than timed.

    python -m benchmarks.host_steps          # the table for the cross-level call and its eager form

At the papers' sizes a loss call's device work is a few hundred microseconds on a CPU, and the
Python around the ops (argument checks, dispatch, autograd glue) is a visible part of it; timing it
on a shared machine moves by several percent between runs. The number of bytecode steps the
interpreter runs for one forward + backward (``sys.settrace`` with opcode events) is the same on
every run, so it shows what a change to the call path does. It counts steps, not their cost: a step
that calls into C (an op) counts once whatever the op does.
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Callable

import torch

from benchmarks import seeds
from contrastkit import CrossLevelContrast, info_nce


def count_steps(fn: Callable[[], object], warmup: bool = True) -> collections.Counter:
    """Interpreter steps of one call of ``fn`` by the package that ran them (``contrastkit``,
    ``torch``, ``benchmarks``, other)."""
    if warmup:
        fn()
    steps = collections.Counter()

    def package(filename: str) -> str:
        for name in ("contrastkit", "benchmarks", "torch"):
            if f"/{name}/" in filename:
                return name
        return "other"

    def trace(frame, event, arg):
        frame.f_trace_opcodes = True
        where = package(frame.f_code.co_filename)

        def local(frame, event, arg):
            if event == "opcode":
                steps[where] += 1
            return local

        return local

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return steps


def _step(loss_fn: Callable[[torch.Tensor], torch.Tensor], leaf: torch.Tensor) -> Callable[[], None]:
    def step():
        loss_fn(leaf.detach().requires_grad_()).backward()

    return step


def cases(batch: int = 8) -> dict[str, Callable[[], None]]:
    """One forward + backward of the cross-level call at CLCC's size, of its eager form, and of
    ``info_nce`` on the same maps (the layers beneath the module)."""
    g = torch.Generator().manual_seed(0)
    global_map, local_map = torch.randn(batch, 128, 5, 5, generator=g), torch.randn(batch, 128, 5, 5, generator=g)
    module = CrossLevelContrast()
    return {
        f"CrossLevelContrast() {batch}×128×5×5": _step(lambda x: module(x, local_map), global_map),
        "info_nce(global, local, groups=B)": _step(
            lambda x: info_nce(x, local_map.detach(), groups=batch, temperature=0.07), global_map),
        "seeds.cross_level_eager": _step(lambda x: seeds.cross_level_eager(x, local_map), global_map),
    }


def table(batch: int = 8) -> str:
    lines = ["| call | steps | of them contrastkit | torch | benchmarks |", "|---|---:|---:|---:|---:|"]
    for name, fn in cases(batch).items():
        steps = count_steps(fn)
        lines.append(f"| {name} | {sum(steps.values()):,} | {steps['contrastkit']:,} | {steps['torch']:,} | "
                     f"{steps['benchmarks']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    print(table(args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
