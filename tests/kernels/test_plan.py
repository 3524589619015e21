"""The plan of the tile loop (``kernels/_plan.py``, ``kernels/_plan_kernels.py``): order, ids, counts,
tile categories, schedules, each_positive's chunks and the backward's row weights — the torch twins
against explicit masks, and the plan kernels against their torch twins at awkward sizes."""

from __future__ import annotations

import pytest
import torch
from contrastkit.kernels import _plan as P

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHARED = P.SHARED_GROUP


def plan_of(labels, key_labels=None, groups=None, key_groups=None, ignore_index=-1, offset=None, negatives=False,
            pos_block=None):
    """The torch twin's plan: (q keys, k keys or None, q_plan, k_plan, out_valid, starts)."""
    q = P.sort_keys(labels, groups, ignore_index)
    k = None if key_labels is None else P.sort_keys(key_labels, key_groups, ignore_index)
    return (q, k, *P.rows(q, k, offset, negatives, pos_block))


def test_rows_sorted_ignored_last_then_by_group_and_label():
    labels = torch.tensor([3, -1, 3, 0, 5, 0, -1])
    groups = torch.tensor([1 << 40, 2, SHARED, 1 << 40, 2, 2, SHARED])
    q, _, q_plan, k_plan, _, _ = plan_of(labels, groups=groups)
    assert k_plan.numel() == 0
    perm = q.perm.tolist()
    # SHARED (-> -1) first, then group 2, then group 2^40, each run by label; ignored rows last, in order.
    assert perm == [2, 5, 4, 3, 0, 1, 6] and q_plan[P.PERM, :7].tolist() == perm
    assert q_plan.shape == (P.QUERY_FIELDS, P.ROW_PAD) and q_plan.dtype == torch.int32
    # ids: order-preserving ranks (rows whose key sorts first), equal labels equal ids, -1 ignored and padding
    label = q_plan[P.LABEL]
    assert label[:5].tolist() == [2, 0, 4, 0, 2] and (label[5:] == -1).all()
    assert q_plan[P.GROUP, :5].tolist() == [-1, 1, 1, 3, 3]


def test_ignored_label_sorts_last_wherever_it_lies():
    """ignore_index between the labels: the keys rotate so that it is the largest."""
    labels = torch.tensor([4, 2, 0, 3, 2, 1])
    q, _, q_plan, _, _, _ = plan_of(labels, ignore_index=2)
    assert labels[q.perm].tolist() == [3, 4, 0, 1, 2, 2]
    assert q_plan[P.LABEL, :6].tolist() == [0, 1, 2, 3, -1, -1]


def test_ids_are_shared_between_queries_and_keys():
    labels, key_labels = torch.tensor([7, 100, 7]), torch.tensor([100, 9, 7, 7])
    q, k, q_plan, k_plan, _, _ = plan_of(labels, key_labels)
    q_ids = dict(zip(q.perm.tolist(), q_plan[P.LABEL].tolist(), strict=False))
    k_ids = dict(zip(k.perm.tolist(), k_plan[P.LABEL].tolist(), strict=False))
    assert q_ids[0] == q_ids[2] == k_ids[2] == k_ids[3] and q_ids[1] == k_ids[0]
    assert k_ids[1] not in (q_ids[0], q_ids[1])
    assert q_ids[0] < k_ids[1] < q_ids[1]  # the ids follow the labels' order


def test_self_column_is_the_sorted_place_of_each_querys_own_key():
    g = torch.Generator().manual_seed(0)
    labels, key_labels = torch.randint(0, 3, (10,), generator=g), torch.randint(-1, 3, (25,), generator=g)
    groups, key_groups = torch.randint(-1, 2, (10,), generator=g), torch.randint(-1, 2, (25,), generator=g)
    for q_groups, k_groups in ((None, None), (groups, key_groups)):
        q, k, q_plan, _, _, _ = plan_of(labels, key_labels, q_groups, k_groups, offset=6)
        cols = q_plan[P.SELF, :10].long()
        assert torch.equal(k.perm[cols], q.perm + 6)
        assert (q_plan[P.SELF, 10:] == -1).all()


def _masks(labels, key_labels, groups, key_groups, offset):
    n, m = labels.numel(), key_labels.numel()
    cand = (labels[:, None] != -1) & (key_labels[None, :] != -1)
    if groups is not None:
        cand &= (groups[:, None] == key_groups[None, :]) | (groups[:, None] == SHARED) | (key_groups[None, :] == SHARED)
    if offset is not None:
        cand &= torch.arange(n)[:, None] + offset != torch.arange(m)[None, :]
    return cand & (labels[:, None] == key_labels[None, :]), cand


def test_pair_counts_match_the_masks():
    g = torch.Generator().manual_seed(1)
    n, m = 70, 90
    labels, key_labels = torch.randint(-1, 4, (n,), generator=g), torch.randint(-1, 4, (m,), generator=g)
    groups, key_groups = torch.randint(-1, 3, (n,), generator=g), torch.randint(-1, 3, (m,), generator=g)
    for qg, kg, offset in [(groups, key_groups, None), (None, None, 11), (groups, key_groups, 5)]:
        for negatives in (False, True):
            q, _, q_plan, _, out_valid, _ = plan_of(labels, key_labels, qg, kg, offset=offset, negatives=negatives)
            pos, cand = _masks(labels, key_labels, qg, kg, offset)
            assert q_plan[P.N_POS, :n].tolist() == pos.sum(1)[q.perm].tolist()
            valid = (pos.sum(1) > 0) & (~torch.tensor(negatives) | (cand.sum(1) > pos.sum(1)))
            assert out_valid.tolist() == valid.tolist() and q_plan[P.VALID, :n].tolist() == valid[q.perm].tolist()
            assert (q_plan[P.N_POS, n:] == 0).all() and (q_plan[P.VALID, n:] == 0).all()
    # self-contrast: the same rows on both sides
    q, _, q_plan, _, _, _ = plan_of(labels, groups=groups, offset=0)
    pos, _ = _masks(labels, labels, groups, groups, 0)
    assert q_plan[P.N_POS, :n].tolist() == pos.sum(1)[q.perm].tolist()


def test_categories_skip_mask_and_clean():
    # Rows already in sorted order, 4 tiles of 32: (group 0, label 0), (group 0, label 1), (group 1,
    # label 0), then (group 1, label 1) and ignored rows.
    labels = torch.tensor([0] * 32 + [1] * 32 + [0] * 32 + [1] * 16 + [-1] * 16)
    groups = torch.tensor([0] * 64 + [1] * 64)
    q, _, q_plan, _, _, _ = plan_of(labels, groups=groups, offset=0)
    assert q.perm.tolist() == list(range(128))
    cat = P.categories(q_plan, q_plan, 32, 32, True, True)
    assert cat.shape == (4, 4)
    # groups 0 and 1 never meet
    assert cat[0, 2] == P.SKIP and cat[2, 0] == P.SKIP and cat[1, 3] == P.SKIP
    # one group, label ranges apart: every pair a negative candidate -> clean
    assert cat[0, 1] == P.CLEAN and cat[1, 0] == P.CLEAN
    # the diagonal (own keys) -> masked
    assert cat[0, 0] == P.MASKED and cat[3, 3] == P.MASKED
    # a key tile with ignored rows needs the mask; a query tile with them does not
    assert cat[2, 3] == P.MASKED and cat[3, 2] == P.CLEAN
    assert P.categories(q_plan, q_plan, 32, 32, True, True, both_valid=True)[3, 2] == P.MASKED
    sched = P.schedule(cat)
    assert sched.counts.tolist()[0] == [1, 0, 1] and sched.order[0, :2].tolist() == [1, 0]
    assert P.schedule(cat.T).counts.tolist() == [[1, 0, 1], [1, 0, 1], [1, 0, 1], [0, 0, 2]]
    # without the own keys the diagonal tiles hold positives
    cat = P.categories(q_plan, q_plan, 32, 32, True, False)
    assert cat[0, 0] == P.POSITIVE and cat[3, 3] == P.MASKED and cat[2, 2] == P.POSITIVE
    assert P.schedule(cat).order[2, :2].tolist() == [2, 3]


def test_categories_hold_every_pair_of_the_masks():
    """Brute force on random layouts: a clean tile pair has only candidates and no positive, a positive
    one only candidates, a skipped one no candidate."""
    g = torch.Generator().manual_seed(2)
    n, m = 150, 170
    for offset in (None, 3):
        labels, key_labels = torch.randint(-1, 5, (n,), generator=g), torch.randint(-1, 5, (m,), generator=g)
        groups, key_groups = torch.randint(-1, 3, (n,), generator=g), torch.randint(-1, 3, (m,), generator=g)
        q, k, q_plan, k_plan, _, _ = plan_of(labels, key_labels, groups, key_groups, offset=offset)
        pos, cand = _masks(labels, key_labels, groups, key_groups, offset)
        pos, cand = pos[q.perm][:, k.perm], cand[q.perm][:, k.perm]
        cat = P.categories(q_plan, k_plan, 32, 16, True, offset is not None)
        for i in range(cat.shape[0]):
            for j in range(cat.shape[1]):
                c = cand[32 * i:32 * i + 32, 16 * j:16 * j + 16]
                p = pos[32 * i:32 * i + 32, 16 * j:16 * j + 16]
                rows_valid = (q_plan[P.LABEL, 32 * i:32 * i + 32] >= 0)[: c.shape[0], None]
                if cat[i, j] == P.SKIP:
                    assert not c.any()
                if cat[i, j] >= P.POSITIVE:
                    assert (c | ~rows_valid).all() and c.shape[1] == 16
                if cat[i, j] == P.CLEAN:
                    assert not p.any()


def test_symmetric_categories_demote_tiles_whose_log_sum_exps_spread():
    labels = torch.arange(128) % 4
    _, _, q_plan, _, _, _ = plan_of(labels, offset=0)
    lse2 = torch.zeros(P.ROW_PAD)

    def cat(lse2, block_n, block_m):
        valid = q_plan[P.LABEL] >= 0
        lo = torch.where(valid, lse2, float("inf")).view(-1, P.CHUNK).amin(1)
        hi = torch.where(valid, lse2, float("-inf")).view(-1, P.CHUNK).amax(1)
        return P.categories(q_plan, q_plan, block_n, block_m, False, True, True, torch.cat([lo, hi]))

    assert (cat(lse2, 32, 32) == P.categories(q_plan, q_plan, 32, 32, False, True, both_valid=True)).all()
    lse2[40] = -P.SYMMETRIC_SPREAD - 1  # row 40 (tile 1) far below the others
    c = cat(lse2, 32, 32)
    assert c[1, 0] == P.MASKED and c[0, 1] == P.MASKED and c[2, 3] == P.CLEAN
    assert c[0, 0] == P.MASKED  # the diagonal
    c = cat(lse2, 64, 32)
    assert c.shape == (2, 4) and (c[0] == P.MASKED).all() and c[1, 0] == P.CLEAN and c[1, 1] == P.MASKED


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
    q, k, q_plan, k_plan, _, starts = plan_of(labels, key_labels, groups, key_groups, offset=5, pos_block=block)
    table, count = P.positive_chunks(q, k, starts, block)
    assert table.dtype == torch.int32 and table.shape == (q_plan.shape[1], 7)
    assert count.tolist() == [int((table[:, 1] > table[:, 0]).sum())] and (table[count.item():] == 0).all()
    q_label, q_group = q_plan[P.LABEL].tolist(), q_plan[P.GROUP].tolist()
    k_label, k_group = k_plan[P.LABEL].tolist(), k_plan[P.GROUP].tolist()
    owner = {}
    for index, (start, end, lo_a, hi_a, lo_b, hi_b, exact) in enumerate(table[: count.item()].tolist()):
        assert 0 < end - start <= block and len({q_group[i] for i in range(start, end)}) == 1
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


# ----------------------------------------------------------------------------- kernels against twins

CASES = [  # (n, m or None for self-contrast, groups, offset, ignore_index, seed)
    (1, None, False, 0, -1, 0), (37, None, False, 0, -1, 1), (130, None, True, 0, -1, 2),
    (257, None, True, 0, 3, 3), (37, 53, False, None, -1, 4), (130, 257, True, None, -1, 5),
    (53, 130, True, 60, -1, 6), (130, 257, False, 11, 2, 7), (1, 1, True, 0, -1, 8), (300, 300, True, 0, -1, 9),
]


def _case(n, m, groups, offset, ignore_index, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, 5, (n,), generator=g)
    labels[: n // 3] = 2  # a large class
    q_groups = torch.randint(-1, 3, (n,), generator=g) * (1 << 33) if groups else None
    if groups:
        q_groups[q_groups < 0] = SHARED
    if m is None:
        return labels, None, q_groups, None, offset, ignore_index
    key_labels = torch.randint(-1, 5, (m,), generator=g)
    k_groups = None
    if groups:
        k_groups = torch.randint(-1, 3, (m,), generator=g) * (1 << 33)
        k_groups[k_groups < 0] = SHARED
    return labels, key_labels, q_groups, k_groups, offset, ignore_index


def _launched_plan(labels, key_labels, groups, key_groups, offset, ignore_index, denominator, pos_block):
    from contrastkit.kernels import info_nce as ops

    settings = ops.Settings(denominator, True, ignore_index, offset)
    q = P.sort_keys(labels.to(DEVICE), None if groups is None else groups.to(DEVICE), ignore_index)
    k = None if key_labels is None else P.sort_keys(key_labels.to(DEVICE),
                                                    None if key_groups is None else key_groups.to(DEVICE),
                                                    ignore_index)
    return q, k, ops._plan_rows(q, k, settings, pos_block)


def _stats_part(plan):
    return torch.cat([plan[: P.STATS].flatten(), P.stats_of(plan).flatten(), plan[P.STATS + 1:].flatten()]).cpu()


@pytest.mark.parametrize("case", CASES, ids=[f"n{c[0]}-m{c[1]}-g{int(c[2])}-o{c[3]}" for c in CASES])
def test_plan_kernels_match_their_torch_twins(case):
    """plan_rows_kernel, plan_schedule_kernel and plan_chunks_kernel give the torch twins' plan, tile
    lists and chunks, at sizes around the 128-row padding and the 16-row chunks."""
    from contrastkit.kernels import info_nce as ops

    labels, key_labels, groups, key_groups, offset, ignore_index = case = _case(*case)
    has_groups, has_self = groups is not None, offset is not None
    for denominator, pos_block in (("all", None), ("negatives", None), ("each_positive", 16), ("each_positive", 32)):
        q, k, (q_plan, k_plan, out_valid, starts) = _launched_plan(*case, denominator, pos_block)
        twin = P.rows(P.sort_keys(labels, groups, ignore_index),
                      None if key_labels is None else P.sort_keys(key_labels, key_groups, ignore_index), offset,
                      denominator == "negatives", pos_block)
        assert torch.equal(_stats_part(q_plan), _stats_part(twin[0])), denominator
        assert torch.equal(out_valid.cpu(), twin[2])
        if key_labels is not None:
            assert torch.equal(_stats_part(k_plan), _stats_part(twin[1]))
        if pos_block is not None:
            assert torch.equal(starts.cpu(), twin[3])
            table, count = ops._positive_chunks(q, k, starts, pos_block)
            want, want_count = P.positive_chunks(q, k, starts, pos_block)
            assert torch.equal(count.cpu(), want_count.cpu())
            assert torch.equal(table[: int(count)].cpu(), want[: int(count)].cpu())
    k_side = q_plan if key_labels is None else k_plan
    for block_n, block_m in ((32, 32), (64, 16), (16, 128), (128, 64)):
        for by_keys in (False, True):
            got = ops._schedule(q_plan, k_side, block_n, block_m, has_groups, has_self, by_keys=by_keys)
            cat = P.categories(q_plan.cpu(), k_side.cpu(), block_n, block_m, has_groups, has_self)
            want = P.schedule(cat.T if by_keys else cat)
            assert torch.equal(got.counts.cpu(), want.counts)
            for row, (clean, positive, masked) in enumerate(want.counts.tolist()):
                listed = clean + positive + masked
                assert torch.equal(got.order[row, :listed].cpu(), want.order[row, :listed])


@pytest.mark.parametrize("each_positive", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_backward_rows_kernel_matches_its_torch_twin(symmetric, each_positive):
    """backward_rows_kernel (after gather_partials_kernel) gives the twin's weights, tile maxima, chunk
    log-sum-exp ranges and prescales, and the symmetric schedule with the spread check the twin's."""
    from contrastkit.kernels import info_nce as ops

    g = torch.Generator().manual_seed(20)
    n, m = 130, 257
    case = _case(n, None if symmetric else m, False, 0 if symmetric else None, -1, 21)
    q, k, (q_plan, k_plan, _, _) = _launched_plan(*case, "each_positive" if each_positive else "all",
                                                 16 if each_positive else None)
    n_pad = q_plan.shape[1]
    lse2 = torch.randn(n_pad, generator=g) * 5
    lse2[n + 70:] = float("-inf")  # padding tiles: no valid row, their maximum is -inf
    lse2[41] = -100.0  # far below the others: its tiles lose the one-exponential form
    lse2 = lse2.to(DEVICE)
    pos_sigmoid = torch.rand(n_pad, generator=g).to(DEVICE)
    pos_sigmoid[q_plan[P.VALID] == 0] = float("nan")  # the positive pass leaves those rows unwritten
    grad_loss = (torch.randn(n, generator=g) * 1e-3).to(DEVICE)
    x = torch.randn(n, 24, generator=g).to(DEVICE)
    tau = torch.tensor([0.3], device=DEVICE)
    _, q_inv, q_partials = ops.gather_rows(x, q_plan[P.PERM], True, grad_loss, q_plan[P.VALID])
    k_inv = k_partials = None
    if not symmetric:
        keys = torch.randn(m, 24, generator=g).to(DEVICE)
        _, k_inv, k_partials = ops.gather_rows(keys, k_plan[P.PERM], True, grad_loss)
    for block_n, block_m in ((32, 32), (128, 64), (16, 128)):
        got = ops._backward_rows(grad_loss, q_plan, n, lse2, pos_sigmoid, q_inv, q_partials, k_inv, k_partials, tau,
                                 each_positive, symmetric, block_n, block_m)
        want = P.backward_rows(grad_loss.cpu(), q_plan.cpu(), n, lse2.cpu(), pos_sigmoid.cpu(), q_inv.cpu(),
                               None if k_inv is None else k_inv.cpu(), tau.cpu(), each_positive, symmetric, block_n,
                               block_m)
        for name, a, b in zip(("weights", "row_max", "col_max", "lse_stats", "scales"), got, want, strict=True):
            if b is None:
                continue
            a = a.cpu()[: b.numel()] if name == "scales" else a.cpu()  # (self-contrast has one scale)
            assert a.shape == b.shape, name
            assert torch.allclose(a, b, rtol=1e-6, atol=0, equal_nan=True), name
        if symmetric:
            sched = ops._schedule(q_plan, q_plan, block_n, block_m, False, True, both_valid=True, lse_stats=got[3])
            cat = P.categories(q_plan.cpu(), q_plan.cpu(), block_n, block_m, False, True, True, want[3])
            assert torch.equal(sched.counts.cpu(), P.schedule(cat).counts)
            if block_n == 32:  # both kinds at small tiles: one row tile holds the far row
                assert (cat == P.MASKED).any() and (cat >= P.POSITIVE).any()
