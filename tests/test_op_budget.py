"""The op budget (benchmarks/op_budget.py): the counter counts what it says, and every loss stays
within its budget of device ops and host syncs per forward + backward."""

from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import op_budget as ob  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
PATHS = tuple(ob.PATHS) if HAS_TRITON else tuple(p for p in ob.PATHS if p != "gpu")


def _leaves(*shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g).requires_grad_(True) for shape in shapes]


def test_counts_the_ops_of_a_product_and_its_backward():
    a, b = _leaves((4, 3), (4, 3))

    def step():
        a.grad = b.grad = None
        (a * b).sum().backward()

    count = ob.count_ops(step)
    # forward: mul, sum; backward: the seed gradient (ones_like), sum's expand (a view), mul for each input
    assert count.names == collections.Counter({"aten::mul": 3, "aten::sum": 1, "aten::ones_like": 1})
    assert (count.ops, count.syncs, count.kernels) == (5, 0, 0)


def test_views_and_bare_allocations_count_nothing_copies_and_fills_count():
    (x,) = _leaves((4, 3))
    assert ob.count_ops(lambda: x.view(12).reshape(3, 4).t().unsqueeze(0).expand(2, -1, -1)[0, 1:]).ops == 0
    assert ob.count_ops(lambda: (torch.empty(3), torch.empty_like(x), x.contiguous(), x.to(x.dtype))).ops == 0
    copy = ob.count_ops(lambda: x.t().reshape(12))  # reshape of a transposed tensor copies
    assert copy.names == collections.Counter({"aten::clone": 1})
    assert ob.count_ops(lambda: (torch.zeros(3), torch.full((2,), 1.0), torch.ones_like(x))).ops == 3


def test_counts_host_syncs():
    (x,) = _leaves((6,))
    mask = torch.tensor([True, False, True, True, False, True])

    def masked_step():
        x.grad = None
        x[mask].sum().backward()

    count = ob.count_ops(masked_step)
    # forward: index (a nonzero inside), sum; backward: ones_like, new_zeros, index_put (a nonzero inside)
    assert count.syncs == 2 and count.sync_names == collections.Counter({"aten::nonzero": 2})
    assert count.ops == 5

    scalar = ob.count_ops(lambda: x.sum().item())
    assert (scalar.ops, scalar.syncs) == (1, 1)
    assert ob.count_ops(lambda: bool(x.sum() > 0)).syncs == 1
    assert ob.count_ops(lambda: x.tolist()).sync_names == collections.Counter({ob.PYTHON_SYNC: 1})
    repeats = torch.tensor([1, 0, 2, 1, 1, 1])
    # a tensor of repeats: the total and the check for negative repeats are read; output_size spares both
    assert ob.count_ops(lambda: x.repeat_interleave(repeats)).syncs == 2
    assert ob.count_ops(lambda: x.repeat_interleave(repeats, output_size=6)).syncs == 0
    assert ob.count_ops(lambda: x.repeat_interleave(2)).syncs == 0


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernel_launches_are_recorded_not_run():
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) + 1, mask=offsets < n)

    x = torch.zeros(8)
    count = ob.count_ops(lambda: (add_one[(1,)](x, 8, BLOCK=8), add_one[(2,)](x, 8, BLOCK=8)), warmup=False)
    assert count.kernels == 2 and count.kernel_names == collections.Counter({"add_one": 2})
    assert count.ops == 0 and torch.equal(x, torch.zeros(8))


# ----------------------------------------------------------------------------- the budgets


@pytest.fixture(scope="module")
def measured():
    """Each case's counts, measured once on every path (CI sizes, see ``Case.fast``) in the steady state
    of a training loop: after one unprofiled call (a number τ becomes a tensor once, then is reused)."""
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = ob.measure(case, PATHS, warmup=True, fast=True)
        return cache[case]
    return get


@pytest.mark.parametrize("case", [name for name, case in ob.CASES.items() if case.budgeted])
def test_case_within_budget(case, measured):
    counts = measured(case)
    assert ob.over_budget({case: counts}) == []
    assert all(ob.budget_of(case, path) is not None for path in ob.PATHS)
    for path, count in counts.items():
        assert count.ops > 0, f"{case} {path}: no device op counted"


def test_auto_takes_the_kernels_only_on_the_gpu_path(measured):
    counts = measured("supcon8")
    assert counts["cpu"].backends == ("torch",) and counts["cpu"].kernels == 0
    if HAS_TRITON:
        assert counts["gpu"].backends == ("triton",) and counts["gpu"].kernels >= 2


@pytest.mark.parametrize("case", list(ob.TARGETS))
def test_a_met_target_is_the_budget(case, measured):
    """Where a count meets its target, the budget is the target, so that it stays met."""
    counts = measured(case)
    for path, target in ob.TARGETS[case].items():
        if path not in counts:
            continue
        budget, count = ob.budget_of(case, path), counts[path]
        for name, measured_value, limit, allowed in zip(("device ops", "syncs"), (count.ops, count.syncs), target,
                                                        budget, strict=True):
            if limit is not None and measured_value <= limit:
                assert allowed <= limit, (f"{case} {path} meets its target of {limit} {name} ({measured_value}): "
                                          f"lower its budget in BUDGETS from {allowed} to {limit}")


def test_check_exits_nonzero_over_budget(monkeypatch, capsys):
    assert ob.main(["--cases", "patch_nce", "--check"]) == 0
    tight = {path: (ops - 1, syncs) for path, (ops, syncs) in ob.BUDGETS["patch_nce"].items()}
    monkeypatch.setitem(ob.BUDGETS, "patch_nce", tight)
    assert ob.main(["--cases", "patch_nce", "--paths", "cpu", "--check"]) == 1
    out = capsys.readouterr().out
    assert "over budget: patch_nce cpu" in out and "| patch_nce | cpu |" in out and "OVER BUDGET" in out
