"""The host side of the tile loop (``kernels/_plan.py``): order, dense ids, tile categories, schedules."""

from __future__ import annotations

import torch
from contrastkit.kernels import _plan as P

SHARED = P.SHARED_GROUP


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
    # the diagonal (own keys) -> masked
    assert cat[0, 0] == P.MASKED and cat[3, 3] == P.MASKED
    # a key tile with ignored rows needs the mask; a query tile with them does not
    assert cat[2, 3] == P.MASKED and cat[3, 2] == P.CLEAN
    assert P.categories(plan, 32, 32, both_valid=True)[3, 2] == P.MASKED
    sched = P.schedule(cat)
    assert sched.counts.tolist() == [[1, 0, 1], [1, 0, 1], [0, 0, 2], [1, 0, 1]]
    assert sched.order[0, :2].tolist() == [1, 0] and sched.order[2, :2].tolist() == [2, 3]
    # the key side's programs take the transpose
    assert P.schedule(cat.T).counts.tolist() == [[1, 0, 1], [1, 0, 1], [1, 0, 1], [0, 0, 2]]
    # without own keys, a tile pair of one group whose labels overlap holds positives: label compares only
    cat = P.categories(P.make_plan(labels, labels, groups, groups, -1, None, symmetric=True), 32, 32)
    assert cat[0, 0] == P.POSITIVE and cat[3, 3] == P.MASKED and cat[2, 2] == P.POSITIVE
    assert P.schedule(cat).order[2, :2].tolist() == [2, 3]


def test_symmetric_clean_pairs_need_close_log_sum_exps():
    labels = torch.arange(4).repeat_interleave(32)
    plan = P.make_plan(labels, labels, None, None, -1, 0, symmetric=True)
    lse2 = torch.zeros(P.ROW_PAD)
    assert (P.symmetric_categories(plan, 32, 32, lse2) == P.categories(plan, 32, 32, both_valid=True)).all()
    lse2[40] = -P.SYMMETRIC_SPREAD - 1  # row 40 (tile 1) far below the others
    cat = P.symmetric_categories(plan, 32, 32, lse2)
    assert cat[1, 0] == P.MASKED and cat[0, 1] == P.MASKED and cat[2, 3] == P.CLEAN
    assert cat[0, 0] == P.MASKED  # the diagonal
    # row tiles of 64, column tiles of 32: row tile 0 holds row 40
    cat = P.symmetric_categories(plan, 64, 32, lse2)
    assert cat.shape == (2, 4) and (cat[0] == P.MASKED).all() and cat[1, 0] == P.CLEAN and cat[1, 1] == P.MASKED


def test_pair_counts_match_the_masks():
    g = torch.Generator().manual_seed(1)
    n, m = 70, 90
    labels, key_labels = torch.randint(-1, 4, (n,), generator=g), torch.randint(-1, 4, (m,), generator=g)
    groups, key_groups = torch.randint(-1, 3, (n,), generator=g), torch.randint(-1, 3, (m,), generator=g)
    groups[groups < 0], key_groups[key_groups < 0] = SHARED, SHARED
    for case in [(groups, key_groups, None), (None, None, 11), (groups, key_groups, 5)]:
        qg, kg, offset = case
        plan = P.make_plan(labels, key_labels, qg, kg, -1, offset, symmetric=False)
        positives, candidates = P.pair_counts(plan)
        cand = (labels[:, None] != -1) & (key_labels[None, :] != -1)
        if qg is not None:
            cand &= (qg[:, None] == kg[None, :]) | (qg[:, None] == SHARED) | (kg[None, :] == SHARED)
        if offset is not None:
            cand &= torch.arange(n)[:, None] + offset != torch.arange(m)[None, :]
        pos = cand & (labels[:, None] == key_labels[None, :])
        assert positives[:n].tolist() == pos.sum(1)[plan.q.perm].tolist()
        assert candidates[:n].tolist() == cand.sum(1)[plan.q.perm].tolist()
        assert (positives[n:] == 0).all() and (candidates[n:] == 0).all()
    # self-contrast: the same rows on both sides
    plan = P.make_plan(labels, labels, groups, groups, -1, 0, symmetric=True)
    positives, _ = P.pair_counts(plan)
    cand = (labels[:, None] != -1) & (labels[None, :] != -1) & ~torch.eye(n, dtype=torch.bool)
    cand &= (groups[:, None] == groups[None, :]) | (groups[:, None] == SHARED) | (groups[None, :] == SHARED)
    pos = cand & (labels[:, None] == labels[None, :])
    assert positives[:n].tolist() == pos.sum(1)[plan.q.perm].tolist()


def _meets(q_group, k_group):
    return q_group < 0 or k_group < 0 or q_group == k_group


def test_positive_chunks_cover_each_row_once_and_hold_all_its_positives():
    """each_positive's chunks, brute force on a random layout with large and small classes, SHARED
    rows on both sides, ignored rows and an own key per query."""
    g = torch.Generator().manual_seed(3)
    n, m, block = 300, 320, 16
    labels = torch.cat([torch.zeros(40, dtype=torch.int64), torch.randint(0, 6, (n - 40,), generator=g)])
    groups = torch.randint(0, 3, (n,), generator=g)
    groups[torch.rand(n, generator=g) < 0.1] = SHARED
    groups[:20] = SHARED  # a large SHARED class: one label, yet not every key of its range is a positive
    labels[torch.rand(n, generator=g) < 0.05] = -1
    key_labels = torch.randint(-1, 6, (m,), generator=g)
    key_groups = torch.randint(0, 3, (m,), generator=g)
    key_groups[torch.rand(m, generator=g) < 0.15] = SHARED
    plan = P.make_plan(labels, key_labels, groups, key_groups, -1, 5, symmetric=False)
    table, count = P.positive_chunks(plan, block)
    assert table.dtype == torch.int32 and table.shape == (plan.q.label.numel(), 7)
    assert count.tolist() == [int((table[:, 1] > table[:, 0]).sum())] and (table[count.item():] == 0).all()
    q_label, q_group = plan.q.label.tolist(), plan.q.group.tolist()
    k_label, k_group = plan.k.label.tolist(), plan.k.group.tolist()
    owner = {}
    for index, (start, end, lo_a, hi_a, lo_b, hi_b, exact) in enumerate(table.tolist()):
        if end <= start:
            assert (start, end, hi_a - lo_a, hi_b - lo_b) == (0, 0, 0, 0)
            continue
        assert end - start <= block and len({q_group[i] for i in range(start, end)}) == 1
        ranges = set(range(lo_a, hi_a)) | set(range(lo_b, hi_b))
        assert hi_a <= lo_b or hi_b <= lo_a or hi_b == lo_b, "ranges overlap"
        for i in range(start, end):
            assert i not in owner
            owner[i] = index
            positives = {j for j in range(len(k_label)) if k_label[j] == q_label[i] and k_label[j] >= 0
                         and _meets(q_group[i], k_group[j])}
            assert positives <= ranges
            if exact:
                assert positives == ranges
        assert bool(exact) == (len({q_label[i] for i in range(start, end)}) == 1 and q_group[start] >= 0)
    assert set(owner) == {i for i, label in enumerate(q_label) if label >= 0}
    # the 40 rows of class 0 in each group start chunks of their own: exact chunks of `block` rows
    assert (table[:, 6] == 1).sum() >= 3 and ((table[:, 1] - table[:, 0]) == block).any()
    assert ((table[:, 6] == 0) & (table[:, 1] > table[:, 0])).any() and (table[:, 5] > table[:, 4]).any()
