"""The host side of the tile loop (``kernels/_plan.py``): order, dense ids, tile categories, schedules."""

from __future__ import annotations

import torch
from contrastkit.kernels import _plan as P

from contrastkit import SHARED


def test_rows_sorted_ignored_last_then_by_group_and_label():
    labels = torch.tensor([3, -1, 3, 0, 5, 0, -1])
    groups = torch.tensor([1 << 40, 2, SHARED, 1 << 40, 2, 2, SHARED])
    plan = P.make_plan(labels, labels, groups, groups, -1, None, symmetric=True)
    assert plan.k is plan.q and plan.self_col is None
    perm = plan.q.perm.tolist()
    # SHARED (-> -1) first, then group 2, then group 2^40, each run by label; ignored rows last, in order.
    assert perm == [2, 5, 4, 3, 0, 1, 6]
    assert plan.q.label.numel() == P.ROW_PAD and plan.q.label.dtype == torch.int32
    # dense ranks of the values (ignore_index among them), -1 for ignored and padding rows
    assert plan.q.label[:7].tolist() == [2, 1, 3, 1, 2, -1, -1] and (plan.q.label[7:] == -1).all()
    assert plan.q.group[:5].tolist() == [-1, 1, 1, 2, 2]


def test_ids_are_shared_between_queries_and_keys():
    labels, key_labels = torch.tensor([7, 100, 7]), torch.tensor([100, 9, 7, 7])
    plan = P.make_plan(labels, key_labels, None, None, -1, None, symmetric=False)
    q = dict(zip(plan.q.perm.tolist(), plan.q.label.tolist(), strict=False))
    k = dict(zip(plan.k.perm.tolist(), plan.k.label.tolist(), strict=False))
    assert q[0] == q[2] == k[2] == k[3] and q[1] == k[0] and k[1] not in (q[0], q[1])


def test_self_column_is_the_sorted_place_of_each_querys_own_key():
    g = torch.Generator().manual_seed(0)
    labels, key_labels = torch.randint(0, 3, (10,), generator=g), torch.randint(-1, 3, (25,), generator=g)
    plan = P.make_plan(labels, key_labels, None, None, -1, 6, symmetric=False)
    cols = plan.self_col[:10].long()
    assert torch.equal(plan.k.perm[cols], plan.q.perm + 6)
    assert (plan.self_col[10:] == -1).all()


def test_categories_skip_mask_and_clean():
    # Rows already in sorted order, 4 tiles of 32: (group 0, label 0), (group 0, label 1), (group 1,
    # label 0), then (group 1, label 1) and ignored rows.
    labels = torch.tensor([0] * 32 + [1] * 32 + [0] * 32 + [1] * 16 + [-1] * 16)
    groups = torch.tensor([0] * 64 + [1] * 64)
    plan = P.make_plan(labels, labels, groups, groups, -1, 0, symmetric=True)
    assert plan.q.perm.tolist() == list(range(128))
    cat = P.categories(plan, 32, 32)
    assert cat.shape == (4, 4)
    # groups 0 and 1 never meet
    assert cat[0, 2] == P.SKIP and cat[2, 0] == P.SKIP and cat[1, 3] == P.SKIP
    # one group, label ranges apart: every pair a negative candidate -> clean
    assert cat[0, 1] == P.CLEAN and cat[1, 0] == P.CLEAN
    # the diagonal (own keys, and positives) -> masked
    assert cat[0, 0] == P.MASKED and cat[3, 3] == P.MASKED
    # a key tile with ignored rows needs the mask; a query tile with them does not
    assert cat[2, 3] == P.MASKED and cat[3, 2] == P.CLEAN
    assert P.categories(plan, 32, 32, both_valid=True)[3, 2] == P.MASKED
    sched = P.schedule(cat)
    assert sched.counts.tolist() == [[1, 1], [1, 1], [0, 2], [1, 1]]
    assert sched.order[0, :2].tolist() == [1, 0] and sched.order[2, :2].tolist() == [2, 3]
    # the key side's programs take the transpose
    assert P.schedule(cat.T).counts.tolist() == [[1, 1], [1, 1], [1, 1], [0, 2]]


def test_symmetric_clean_pairs_need_close_log_sum_exps():
    labels = torch.arange(4).repeat_interleave(32)
    plan = P.make_plan(labels, labels, None, None, -1, 0, symmetric=True)
    lse2 = torch.zeros(P.ROW_PAD)
    assert (P.symmetric_categories(plan, 32, lse2) == P.categories(plan, 32, 32, both_valid=True)).all()
    lse2[40] = -P.SYMMETRIC_SPREAD - 1  # row 40 (tile 1) far below the others
    cat = P.symmetric_categories(plan, 32, lse2)
    assert cat[1, 0] == P.MASKED and cat[0, 1] == P.MASKED and cat[2, 3] == P.CLEAN
    assert cat[0, 0] == P.MASKED  # the diagonal
