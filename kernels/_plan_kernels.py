"""Triton kernels of the plan (``_plan.py``): the work around the tile loops in a few launches.

- ``plan_rows_kernel``: per sorted row of each side, its int32 ids, and for the queries the self
  column, positive and candidate counts, the contributing flag (also in the caller's row order)
  and each_positive's chunk starts; per 16-row chunk the statistics the tile categories need.
  One launch for both sides.
- ``plan_schedule_kernel``: per program of a tile kernel, the other side's tiles to visit, clean
  first, then positive, then masked, with the three counts. One launch per tile kernel.
- ``plan_chunks_kernel``: each_positive's chunk table from the chunk starts.
- ``gather_partials_kernel`` / ``backward_rows_kernel``: the backward's gathered copies with
  per-program maxima, then every row weight, prescale and tile maximum of the backward kernels.

Every kernel has a torch twin in ``_plan.py`` (what they are tested against, and what runs where
the kernels cannot: CPU tensors without Triton's interpreter). The ids are order-preserving ranks:
a label's id is the number of rows of both sides whose label sorts before it, so equal labels have
equal ids and the ids follow the sort; they come from binary searches of the sorted keys, which
need no scan across programs.
"""

from __future__ import annotations

import triton
import triton.language as tl

INT64_MAX = tl.constexpr(2**63 - 1)
INT64_MIN = tl.constexpr(-(2**63))
BIG = tl.constexpr(2**31 - 1)
SHARED = tl.constexpr(-1)
CHUNK = tl.constexpr(16)  # rows per statistics chunk (_plan.CHUNK)
# Plan fields (_plan.PERM ...) and statistics fields (_plan.STAT_*).
F_PERM, F_LABEL, F_GROUP, F_STATS, F_SELF, F_N_POS, F_VALID = (tl.constexpr(i) for i in range(7))
S_FLAGS, S_LABEL_LO, S_LABEL_HI, S_GROUP_LO, S_GROUP_HI, S_SELF_LO, S_SELF_HI = (tl.constexpr(i) for i in range(7))
ANY_VALID, ALL_VALID, ANY_SHARED, ANY_GROUPED = (tl.constexpr(1 << i) for i in range(4))
SKIP, MASKED, POSITIVE, CLEAN = (tl.constexpr(i) for i in range(4))
LOG2E = tl.constexpr(1.4426950408889634)
PRESCALE_EXPONENT = tl.constexpr(13.0)


# ----------------------------------------------------------------------------- searches


@triton.jit
def _search(keys_ptr, size, value, steps, UPPER: tl.constexpr):
    """Per element of ``value``: the first index of the sorted keys[0:size] with a key > value (UPPER)
    or >= value; ``steps`` >= bit length of size."""
    lo = tl.zeros_like(value).to(tl.int32)
    hi = lo + size
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        key = tl.load(keys_ptr + mid, mask=active, other=0)
        if UPPER:
            after = key <= value
        else:
            after = key < value
        lo = tl.where(active & after, mid + 1, lo)
        hi = tl.where(active & ~after, mid, hi)
    return lo


@triton.jit
def _search_rows(gv_ptr, lv_ptr, lk_ptr, perm_ptr, size, g, lab, index, steps, HAS_GROUPS: tl.constexpr,
                 BY_INDEX: tl.constexpr, UPPER: tl.constexpr):
    """The first sorted row of a side whose (group key, label key[, original row]) is > (UPPER) or >= the
    given one, per element. Sorted rows are ordered so (two stable sorts): by group key, label key,
    original row. Without groups the label keys in sorted order are ``lv``; with groups they are read
    through the permutation."""
    lo = tl.zeros_like(lab).to(tl.int32)
    hi = lo + size
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        if HAS_GROUPS:
            row = tl.load(perm_ptr + mid, mask=active, other=0)
            key = tl.load(lk_ptr + row, mask=active, other=0)
        else:
            key = tl.load(lv_ptr + mid, mask=active, other=0)
            if BY_INDEX:
                row = tl.load(perm_ptr + mid, mask=active, other=0)
        if BY_INDEX:
            after = (key < lab) | ((key == lab) & (row < index))
        elif UPPER:
            after = key <= lab
        else:
            after = key < lab
        if HAS_GROUPS:
            group = tl.load(gv_ptr + mid, mask=active, other=0)
            after = (group < g) | ((group == g) & after)
        lo = tl.where(active & after, mid + 1, lo)
        hi = tl.where(active & ~after, mid, hi)
    return lo


@triton.jit
def _count_rows(gv_ptr, lv_ptr, lk_ptr, perm_ptr, size, g, lab, steps, HAS_GROUPS: tl.constexpr):
    """Rows of a side with this (group key, label key)."""
    return (_search_rows(gv_ptr, lv_ptr, lk_ptr, perm_ptr, size, g, lab, lab, steps, HAS_GROUPS, False, True)
            - _search_rows(gv_ptr, lv_ptr, lk_ptr, perm_ptr, size, g, lab, lab, steps, HAS_GROUPS, False, False))


@triton.jit
def _row_keys(gv_ptr, lv_ptr, lk_ptr, perm_ptr, rows, mask, HAS_GROUPS: tl.constexpr):
    """(group key, label key) of sorted rows."""
    if HAS_GROUPS:
        lab = tl.load(lk_ptr + tl.load(perm_ptr + rows, mask=mask, other=0), mask=mask, other=0)
        g = tl.load(gv_ptr + rows, mask=mask, other=0)
    else:
        lab = tl.load(lv_ptr + rows, mask=mask, other=0)
        g = tl.zeros_like(lab)
    return g, lab


# ----------------------------------------------------------------------------- rows


@triton.jit
def _chunk_stats(plan_ptr, n_pad, pid, label, group, self_col, BLOCK: tl.constexpr):
    """The statistics of the program's 16-row chunks (see _plan.chunk_stats)."""
    chunks: tl.constexpr = BLOCK // CHUNK
    label = tl.reshape(label, (chunks, CHUNK))
    group = tl.reshape(group, (chunks, CHUNK))
    self_col = tl.reshape(self_col, (chunks, CHUNK))
    valid = label >= 0
    grouped = valid & (group >= 0)
    any_valid = tl.max(valid.to(tl.int32), axis=1)
    all_valid = tl.min(valid.to(tl.int32), axis=1)
    any_shared = tl.max((valid & (group < 0)).to(tl.int32), axis=1)
    any_grouped = tl.max(grouped.to(tl.int32), axis=1)
    owns = self_col >= 0
    stats = plan_ptr + F_STATS * n_pad + pid * chunks + tl.arange(0, chunks)
    size = n_pad // CHUNK
    tl.store(stats + S_FLAGS * size, any_valid * ANY_VALID + all_valid * ALL_VALID + any_shared * ANY_SHARED
             + any_grouped * ANY_GROUPED)
    tl.store(stats + S_LABEL_LO * size, tl.min(tl.where(valid, label, BIG), axis=1))
    tl.store(stats + S_LABEL_HI * size, tl.max(tl.where(valid, label, -1), axis=1))
    tl.store(stats + S_GROUP_LO * size, tl.min(tl.where(grouped, group, BIG), axis=1))
    tl.store(stats + S_GROUP_HI * size, tl.max(tl.where(grouped, group, -1), axis=1))
    tl.store(stats + S_SELF_LO * size, tl.min(tl.where(owns, self_col, BIG), axis=1))
    tl.store(stats + S_SELF_HI * size, tl.max(tl.where(owns, self_col, -1), axis=1))


@triton.jit
def plan_rows_kernel(
    q_perm_ptr, q_lk_ptr, q_lv_ptr, q_gk_ptr, q_gv_ptr, n, n_steps,
    k_perm_ptr, k_lk_ptr, k_lv_ptr, k_gk_ptr, k_gv_ptr, m, m_steps,
    q_plan_ptr, n_pad, k_plan_ptr, m_pad, out_valid_ptr, starts_ptr, self_key_offset,
    SYMMETRIC: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr, NEGATIVES: tl.constexpr,
    CHUNK_STARTS: tl.constexpr, POS_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Both sides' plans (``_plan.rows`` is the torch twin) in one launch: the first n_pad / BLOCK
    programs write the queries', the others the keys' (none in self-contrast, where the keys are the
    queries). Per side: ``perm``, ``lk``, ``gk``: its sort permutation and its label and group keys in
    the caller's order; ``lv``: its label keys sorted; ``gv``: its group keys in sorted order."""
    pid = tl.program_id(0)
    query_programs = n_pad // BLOCK
    if pid < query_programs:
        _plan_rows(pid, q_perm_ptr, q_lk_ptr, q_lv_ptr, q_gk_ptr, q_gv_ptr, n, n_steps,
                   k_perm_ptr, k_lk_ptr, k_lv_ptr, k_gk_ptr, k_gv_ptr, m, m_steps,
                   q_plan_ptr, n_pad, out_valid_ptr, starts_ptr, self_key_offset,
                   True, SYMMETRIC, HAS_GROUPS, HAS_SELF, NEGATIVES, CHUNK_STARTS, POS_BLOCK, BLOCK)
    else:
        _plan_rows(pid - query_programs, k_perm_ptr, k_lk_ptr, k_lv_ptr, k_gk_ptr, k_gv_ptr, m, m_steps,
                   q_perm_ptr, q_lk_ptr, q_lv_ptr, q_gk_ptr, q_gv_ptr, n, n_steps,
                   k_plan_ptr, m_pad, out_valid_ptr, starts_ptr, 0,
                   False, SYMMETRIC, HAS_GROUPS, False, NEGATIVES, False, POS_BLOCK, BLOCK)


@triton.jit
def _plan_rows(
    pid, perm_ptr, lk_ptr, lv_ptr, gk_ptr, gv_ptr, n, n_steps,
    o_perm_ptr, o_lk_ptr, o_lv_ptr, o_gk_ptr, o_gv_ptr, m, m_steps,
    plan_ptr, n_pad, out_valid_ptr, starts_ptr, self_key_offset,
    QUERY: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr,
    NEGATIVES: tl.constexpr, CHUNK_STARTS: tl.constexpr, POS_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program's rows of one side's plan; ``o_*``: the other side (this side in self-contrast). The
    queries' side (QUERY) also counts positives and candidates among the keys, finds each query's own
    key and, for each_positive (CHUNK_STARTS), marks where chunks start."""
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    inside = rows < n
    source = tl.load(perm_ptr + rows, mask=inside, other=0)
    lab = tl.load(lk_ptr + source, mask=inside, other=INT64_MAX)
    valid = inside & (lab != INT64_MAX)
    label = _search(lv_ptr, n, lab, n_steps, False)
    if not SYMMETRIC:
        label += _search(o_lv_ptr, m, lab, m_steps, False)
    label = tl.where(valid, label, -1)
    if HAS_GROUPS:
        g = tl.load(gv_ptr + rows, mask=inside, other=0)
        group = _search(gv_ptr, n, g, n_steps, False)
        if not SYMMETRIC:
            group += _search(o_gv_ptr, m, g, m_steps, False)
        group = tl.where(g == SHARED, -1, group)
        group = tl.where(valid, group, 0)
    else:
        g = tl.zeros_like(lab)
        group = tl.zeros_like(label)
    tl.store(plan_ptr + F_PERM * n_pad + rows, source.to(tl.int32))
    tl.store(plan_ptr + F_LABEL * n_pad + rows, label)
    tl.store(plan_ptr + F_GROUP * n_pad + rows, group)
    self_col = tl.full([BLOCK], -1, tl.int32)
    if QUERY:
        # The keys: the other side, or this one in self-contrast.
        if SYMMETRIC:
            k_perm, k_lk, k_lv, k_gk, k_gv, k_size, k_steps = perm_ptr, lk_ptr, lv_ptr, gk_ptr, gv_ptr, n, n_steps
        else:
            k_perm, k_lk, k_lv, k_gk, k_gv, k_size, k_steps = (o_perm_ptr, o_lk_ptr, o_lv_ptr, o_gk_ptr, o_gv_ptr,
                                                               m, m_steps)
        n_keys = _search(k_lv, k_size, tl.full([BLOCK], INT64_MAX, tl.int64), k_steps, False)  # valid keys
        same_label = _search(k_lv, k_size, lab, k_steps, True) - _search(k_lv, k_size, lab, k_steps, False)
        if HAS_GROUPS:
            # A query meets the keys of its group and the SHARED keys; a SHARED query meets every key.
            shared = tl.full([BLOCK], SHARED, tl.int64)
            first = tl.full([BLOCK], INT64_MIN, tl.int64)
            last = tl.full([BLOCK], INT64_MAX, tl.int64)
            positives = (_count_rows(k_gv, k_lv, k_lk, k_perm, k_size, g, lab, k_steps, True)
                         + _count_rows(k_gv, k_lv, k_lk, k_perm, k_size, shared, lab, k_steps, True))
            candidates = (_search_rows(k_gv, k_lv, k_lk, k_perm, k_size, g, last, last, k_steps, True, False, False)
                          - _search_rows(k_gv, k_lv, k_lk, k_perm, k_size, g, first, first, k_steps, True, False,
                                         False)
                          + _search_rows(k_gv, k_lv, k_lk, k_perm, k_size, shared, last, last, k_steps, True, False,
                                         False)
                          - _search_rows(k_gv, k_lv, k_lk, k_perm, k_size, shared, first, first, k_steps, True,
                                         False, False))
            positives = tl.where(g == SHARED, same_label, positives)
            candidates = tl.where(g == SHARED, n_keys, candidates)
        else:
            positives = same_label
            candidates = n_keys
        if HAS_SELF:
            if SYMMETRIC:
                self_col = tl.where(inside, rows, -1)
                own_candidate = valid
                own_positive = valid
            else:
                own = source + self_key_offset
                own_lab = tl.load(k_lk + own, mask=inside, other=INT64_MAX)
                own_candidate = valid & (own_lab != INT64_MAX)
                if HAS_GROUPS:
                    own_g = tl.load(k_gk + own, mask=inside, other=0)
                    own_candidate &= (g == SHARED) | (own_g == SHARED) | (own_g == g)
                else:
                    own_g = tl.zeros_like(own_lab)
                own_positive = own_candidate & (own_lab == lab)
                place = _search_rows(k_gv, k_lv, k_lk, k_perm, k_size, own_g, own_lab, own, k_steps, HAS_GROUPS,
                                     True, False)
                self_col = tl.where(inside, place, -1)
            positives -= own_positive.to(tl.int32)
            candidates -= own_candidate.to(tl.int32)
        positives = tl.where(valid, positives, 0)
        candidates = tl.where(valid, candidates, 0)
        contributing = positives > 0
        if NEGATIVES:
            contributing &= candidates > positives
        tl.store(plan_ptr + F_SELF * n_pad + rows, self_col)
        tl.store(plan_ptr + F_N_POS * n_pad + rows, positives)
        tl.store(plan_ptr + F_VALID * n_pad + rows, contributing.to(tl.int32))
        tl.store(out_valid_ptr + source, contributing, mask=inside)
        if CHUNK_STARTS:
            _chunk_starts(perm_ptr, lk_ptr, lv_ptr, gv_ptr, n, n_steps, rows, valid, g, lab, starts_ptr,
                          HAS_GROUPS, POS_BLOCK)
    _chunk_stats(plan_ptr, n_pad, pid, label, group, self_col, BLOCK)


@triton.jit
def _chunk_starts(perm_ptr, lk_ptr, lv_ptr, gv_ptr, n, steps, rows, valid, g, lab, starts_ptr,
                  HAS_GROUPS: tl.constexpr, POS_BLOCK: tl.constexpr):
    """1 where a chunk of each_positive's positive pass starts (see _plan.chunk_starts), per sorted query."""
    segment_lo = _search_rows(gv_ptr, lv_ptr, lk_ptr, perm_ptr, n, g, lab, lab, steps, HAS_GROUPS, False, False)
    segment_hi = _search_rows(gv_ptr, lv_ptr, lk_ptr, perm_ptr, n, g, lab, lab, steps, HAS_GROUPS, False, True)
    large = segment_hi - segment_lo >= POS_BLOCK
    if HAS_GROUPS:
        group_first = _search(gv_ptr, n, g, steps, False)
    else:
        group_first = tl.zeros_like(rows)
    previous = tl.maximum(rows - 1, 0)
    prev_g, prev_lab = _row_keys(gv_ptr, lv_ptr, lk_ptr, perm_ptr, previous, valid, HAS_GROUPS)
    prev_lo = _search_rows(gv_ptr, lv_ptr, lk_ptr, perm_ptr, n, prev_g, prev_lab, prev_lab, steps, HAS_GROUPS,
                           False, False)
    group_start = rows == group_first
    segment_start = rows == segment_lo
    after_large = segment_start & ~group_start & (rows - prev_lo >= POS_BLOCK)
    anchor = tl.where(large, segment_lo, group_first)
    start = valid & (group_start | (segment_start & (large | after_large)) | ((rows - anchor) % POS_BLOCK == 0))
    tl.store(starts_ptr + rows, start.to(tl.int32))


# ----------------------------------------------------------------------------- chunks


@triton.jit
def plan_chunks_kernel(
    starts_ptr, slots_ptr, n_pad, q_perm_ptr, q_lk_ptr, q_lv_ptr, q_gv_ptr, n, n_steps,
    k_perm_ptr, k_lk_ptr, k_lv_ptr, k_gv_ptr, m, m_steps, table_ptr,
    HAS_GROUPS: tl.constexpr, POS_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    """each_positive's chunk table (``_plan.positive_chunks`` is the torch twin) from the chunk starts
    (``starts``) and their inclusive running count (``slots``: a chunk's row in the table, plus 1)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    start = tl.load(starts_ptr + rows) != 0
    n_valid = _search(q_lv_ptr, n, tl.full([BLOCK], INT64_MAX, tl.int64), n_steps, False)
    # A chunk ends at the next start (at most POS_BLOCK rows on) or at the last valid query.
    ahead = rows[:, None] + 1 + tl.arange(0, POS_BLOCK)[None, :]
    later = tl.load(starts_ptr + ahead, mask=start[:, None] & (ahead < n_pad), other=0) != 0
    end = tl.min(tl.where(later, ahead, BIG), axis=1)
    end = tl.minimum(tl.minimum(end, n_valid), rows + POS_BLOCK)
    g, first = _row_keys(q_gv_ptr, q_lv_ptr, q_lk_ptr, q_perm_ptr, rows, start, HAS_GROUPS)
    _, last = _row_keys(q_gv_ptr, q_lv_ptr, q_lk_ptr, q_perm_ptr, tl.maximum(end - 1, 0), start, HAS_GROUPS)
    exact = first == last
    empty = tl.zeros_like(rows)
    if HAS_GROUPS:
        shared = g == SHARED
        lo_a = _search_rows(k_gv_ptr, k_lv_ptr, k_lk_ptr, k_perm_ptr, m, g, first, first, m_steps, True, False, False)
        hi_a = _search_rows(k_gv_ptr, k_lv_ptr, k_lk_ptr, k_perm_ptr, m, g, last, last, m_steps, True, False, True)
        shared_g = tl.full([BLOCK], SHARED, tl.int64)
        lo_b = _search_rows(k_gv_ptr, k_lv_ptr, k_lk_ptr, k_perm_ptr, m, shared_g, first, first, m_steps, True,
                            False, False)
        hi_b = _search_rows(k_gv_ptr, k_lv_ptr, k_lk_ptr, k_perm_ptr, m, shared_g, last, last, m_steps, True, False,
                            True)
        n_keys = _search(k_lv_ptr, m, tl.full([BLOCK], INT64_MAX, tl.int64), m_steps, False)
        lo_a = tl.where(shared, 0, lo_a)
        hi_a = tl.where(shared, n_keys, hi_a)
        lo_b = tl.where(shared, 0, lo_b)
        hi_b = tl.where(shared, 0, hi_b)
        exact &= ~shared
    else:
        lo_a = _search(k_lv_ptr, m, first, m_steps, False)
        hi_a = _search(k_lv_ptr, m, last, m_steps, True)
        lo_b, hi_b = empty, empty
    entry = table_ptr + (tl.load(slots_ptr + rows) - 1).to(tl.int64) * 7
    tl.store(entry, rows, mask=start)
    tl.store(entry + 1, end, mask=start)
    tl.store(entry + 2, lo_a, mask=start)
    tl.store(entry + 3, hi_a, mask=start)
    tl.store(entry + 4, lo_b, mask=start)
    tl.store(entry + 5, hi_b, mask=start)
    tl.store(entry + 6, exact.to(tl.int32), mask=start)


# ----------------------------------------------------------------------------- schedules


@triton.jit
def _tile_stats(stats_ptr, size, tiles, mask, TILE: tl.constexpr):
    """Per tile of ``tiles``: (any valid, all valid, label lo, label hi, group lo, group hi, any SHARED,
    any grouped) of its TILE rows, from their chunks' statistics (``size`` chunks a field)."""
    per: tl.constexpr = TILE // CHUNK
    chunk = tiles[:, None] * per + tl.arange(0, per)[None, :]
    inside = mask[:, None] & (chunk >= 0)
    flags = tl.load(stats_ptr + S_FLAGS * size + chunk, mask=inside, other=0)
    any_valid = tl.max(((flags & ANY_VALID) != 0).to(tl.int32), axis=1) != 0
    all_valid = tl.min(((flags & ALL_VALID) != 0).to(tl.int32), axis=1) != 0
    any_shared = tl.max(((flags & ANY_SHARED) != 0).to(tl.int32), axis=1) != 0
    any_grouped = tl.max(((flags & ANY_GROUPED) != 0).to(tl.int32), axis=1) != 0
    label_lo = tl.min(tl.load(stats_ptr + S_LABEL_LO * size + chunk, mask=inside, other=BIG), axis=1)
    label_hi = tl.max(tl.load(stats_ptr + S_LABEL_HI * size + chunk, mask=inside, other=-1), axis=1)
    group_lo = tl.min(tl.load(stats_ptr + S_GROUP_LO * size + chunk, mask=inside, other=BIG), axis=1)
    group_hi = tl.max(tl.load(stats_ptr + S_GROUP_HI * size + chunk, mask=inside, other=-1), axis=1)
    return any_valid, all_valid, label_lo, label_hi, group_lo, group_hi, any_shared, any_grouped


@triton.jit
def _lse_range(lse_stats_ptr, size, tiles, mask, TILE: tl.constexpr):
    """Per tile: the smallest and largest log2-sum-exp of its valid rows (+inf, -inf for none)."""
    per: tl.constexpr = TILE // CHUNK
    chunk = tiles[:, None] * per + tl.arange(0, per)[None, :]
    inside = mask[:, None] & (chunk >= 0)
    lo = tl.min(tl.load(lse_stats_ptr + chunk, mask=inside, other=float("inf")), axis=1)
    hi = tl.max(tl.load(lse_stats_ptr + size + chunk, mask=inside, other=float("-inf")), axis=1)
    return lo, hi


@triton.jit
def _schedule_categories(q_stats_ptr, k_stats_ptr, q_size, k_size, lse_stats_ptr, own, others, mask,
                         BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BY_KEYS: tl.constexpr,
                         HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr, BOTH_VALID: tl.constexpr,
                         SPREAD: tl.constexpr, SPREAD_LIMIT: tl.constexpr, TILES: tl.constexpr):
    """The categories (``_plan.categories``) of the owned tile against the tiles ``others``."""
    owned = tl.full([TILES], 0, tl.int32) + own
    if BY_KEYS:
        q_tiles, k_tiles = others, owned
    else:
        q_tiles, k_tiles = owned, others
    (q_any, q_all, q_label_lo, q_label_hi, q_group_lo, q_group_hi, q_shared,
     q_grouped) = _tile_stats(q_stats_ptr, q_size, q_tiles, mask, BLOCK_Q)
    (k_any, k_all, k_label_lo, k_label_hi, k_group_lo, k_group_hi, k_shared,
     k_grouped) = _tile_stats(k_stats_ptr, k_size, k_tiles, mask, BLOCK_K)
    meets = q_any & k_any
    unmasked = k_all
    if BOTH_VALID:
        unmasked &= q_all
    if HAS_GROUPS:
        overlap = (q_group_lo <= k_group_hi) & (k_group_lo <= q_group_hi)
        meets &= q_shared | k_shared | overlap
        lo = tl.minimum(q_group_lo, k_group_lo)
        hi = tl.maximum(q_group_hi, k_group_hi)
        unmasked &= ~q_grouped | ~k_grouped | (lo == hi)
    if HAS_SELF:
        # A tile pair holds an own key where a 16-query chunk's own keys [lo, hi] reach into the key tile.
        per: tl.constexpr = BLOCK_Q // CHUNK
        chunk = q_tiles[:, None] * per + tl.arange(0, per)[None, :]
        inside = mask[:, None] & (chunk >= 0)
        self_lo = tl.load(q_stats_ptr + S_SELF_LO * q_size + chunk, mask=inside, other=BIG)
        self_hi = tl.load(q_stats_ptr + S_SELF_HI * q_size + chunk, mask=inside, other=-1)
        first = (k_tiles * BLOCK_K)[:, None]
        diagonal = tl.max(((self_lo < first + BLOCK_K) & (self_hi >= first)).to(tl.int32), axis=1) != 0
        unmasked &= ~diagonal
    unmasked &= meets
    apart = (q_label_hi < k_label_lo) | (k_label_hi < q_label_lo)
    if SPREAD:
        # Symmetric backward: the one-exponential form needs the rows' log2-sum-exps close together.
        row_lo, row_hi = _lse_range(lse_stats_ptr, q_size, q_tiles, mask, BLOCK_Q)
        col_lo, col_hi = _lse_range(lse_stats_ptr, k_size, k_tiles, mask, BLOCK_K)
        spread_ok = ((col_hi - row_lo) <= SPREAD_LIMIT) & ((row_hi - row_lo) <= SPREAD_LIMIT) & (
            (col_hi - col_lo) <= SPREAD_LIMIT)
        category = tl.where(unmasked & spread_ok, tl.where(apart, CLEAN, POSITIVE), tl.where(meets, MASKED, SKIP))
    else:
        category = tl.where(unmasked, tl.where(apart, CLEAN, POSITIVE), tl.where(meets, MASKED, SKIP))
    return tl.where(mask, category, SKIP)


@triton.jit
def plan_schedule_kernel(
    q_stats_ptr, k_stats_ptr, q_size, k_size, lse_stats_ptr, other_tiles, order_ptr, counts_ptr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BY_KEYS: tl.constexpr, HAS_GROUPS: tl.constexpr,
    HAS_SELF: tl.constexpr, BOTH_VALID: tl.constexpr, SPREAD: tl.constexpr, SPREAD_LIMIT: tl.constexpr,
    TILES: tl.constexpr,
):
    """One program's tile list (``_plan.schedule`` of ``_plan.categories`` is the torch twin): the other
    side's tiles, clean first, then positive, then masked, each in tile order, and the three counts.
    A program owns a query tile of BLOCK_Q rows, or a key tile of BLOCK_K rows (BY_KEYS). The
    statistics are the 16-row chunks' (``q_size``, ``k_size`` chunks a field); ``lse_stats`` the
    chunks' log2-sum-exp range (SPREAD, the symmetric backward)."""
    own = tl.program_id(0)
    n_clean = 0
    n_positive = 0
    n_masked = 0
    for first in range(0, other_tiles, TILES):
        others = first + tl.arange(0, TILES)
        category = _schedule_categories(q_stats_ptr, k_stats_ptr, q_size, k_size, lse_stats_ptr, own, others,
                                        others < other_tiles, BLOCK_Q, BLOCK_K, BY_KEYS, HAS_GROUPS, HAS_SELF,
                                        BOTH_VALID, SPREAD, SPREAD_LIMIT, TILES)
        n_clean += tl.sum((category == CLEAN).to(tl.int32))
        n_positive += tl.sum((category == POSITIVE).to(tl.int32))
        n_masked += tl.sum((category == MASKED).to(tl.int32))
    order = order_ptr + own.to(tl.int64) * other_tiles
    at_clean = 0
    at_positive = n_clean
    at_masked = n_clean + n_positive
    for first in range(0, other_tiles, TILES):
        others = first + tl.arange(0, TILES)
        category = _schedule_categories(q_stats_ptr, k_stats_ptr, q_size, k_size, lse_stats_ptr, own, others,
                                        others < other_tiles, BLOCK_Q, BLOCK_K, BY_KEYS, HAS_GROUPS, HAS_SELF,
                                        BOTH_VALID, SPREAD, SPREAD_LIMIT, TILES)
        is_clean = (category == CLEAN).to(tl.int32)
        is_positive = (category == POSITIVE).to(tl.int32)
        is_masked = (category == MASKED).to(tl.int32)
        tl.store(order + at_clean + tl.cumsum(is_clean, 0) - 1, others, mask=is_clean != 0)
        tl.store(order + at_positive + tl.cumsum(is_positive, 0) - 1, others, mask=is_positive != 0)
        tl.store(order + at_masked + tl.cumsum(is_masked, 0) - 1, others, mask=is_masked != 0)
        at_clean += tl.sum(is_clean)
        at_positive += tl.sum(is_positive)
        at_masked += tl.sum(is_masked)
    tl.store(counts_ptr + 3 * own, n_clean)
    tl.store(counts_ptr + 3 * own + 1, n_positive)
    tl.store(counts_ptr + 3 * own + 2, n_masked)


# ----------------------------------------------------------------------------- the backward's rows


# ----------------------------------------------------------------------------- the backward's rows

# backward_rows_kernel's outputs, one row of n_pad each: the log2-sum-exps of the contributing rows
# (+inf elsewhere), the weights a and b, then (self-contrast) alpha and beta of the one-exponential
# tiles, or (queries and keys) g, the key kernel's a and b and the queries' logit scale c.
W_LSE, W_A, W_B, W_ALPHA, W_BETA = (tl.constexpr(i) for i in range(5))
W_G, W_A_KEY, W_B_KEY, W_Q_SCALE = (tl.constexpr(i) for i in range(3, 7))


@triton.jit
def _largest(partials_ptr, partials, field):
    """The largest of one row of the gathers' per-program maxima."""
    best = tl.zeros([1024], tl.float32)
    for first in range(0, partials, 1024):
        index = first + tl.arange(0, 1024)
        best = tl.maximum(best, tl.load(partials_ptr + field * partials + index, mask=index < partials, other=0.0))
    return tl.max(best, axis=0)


@triton.jit
def _prescale(largest):
    """A power of two that brings ``largest`` (>= 0) to about 2^13; 1 for 0 (info_nce._pow2_prescale)."""
    exponent = PRESCALE_EXPONENT - tl.ceil(tl.log2(tl.maximum(largest, 1e-30)))
    exponent = tl.minimum(tl.maximum(exponent, -100.0), 100.0)
    return tl.where(largest > 0, tl.exp2(exponent), 1.0)


@triton.jit
def _tile_max(values, TILE: tl.constexpr, BLOCK: tl.constexpr):
    """Per TILE rows of ``values`` their largest, as one entry per tile and repeated per row."""
    tiles = tl.max(tl.reshape(values, (BLOCK // TILE, TILE)), axis=1)
    return tiles, tl.reshape(tl.broadcast_to(tiles[:, None], (BLOCK // TILE, TILE)), (BLOCK,))


@triton.jit
def _spread_weight(a, tile_max, lse2):
    """a 2^(tile max - lse2), 0 where a is 0, the exponent clamped to [0, 126] (NaN: 0)."""
    exponent = tile_max - lse2
    exponent = tl.minimum(tl.maximum(tl.where(exponent != exponent, 0.0, exponent), 0.0), 126.0)
    return tl.where(a == 0, 0.0, a * tl.exp2(exponent))


@triton.jit
def backward_rows_kernel(
    grad_ptr, grad_stride, plan_ptr, n, n_pad, lse_ptr, pos_sigmoid_ptr, inv_ptr, partials_ptr, partials,
    k_partials_ptr, k_partials, tau_ptr, out_ptr, row_max_ptr, col_max_ptr, lse_stats_ptr, scales_ptr,
    EACH_POSITIVE: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Every per-row input of the backward kernels, in sorted order (``_plan.backward_rows`` is the torch
    twin): with g_i the incoming gradient of a contributing row (0 elsewhere) and |P_i| its positive
    count, b_i = 1 / |P_i| and a_i = 1 ("all", "negatives") or b_i sum_p sigmoid(lse_i - s_ip)
    ("each_positive"). Self-contrast (SYMMETRIC) scales both by g_i and one power of two, and adds
    alpha and beta of the one-exponential tiles from the largest log2-sum-exp of each row tile of
    BLOCK_N and column tile of BLOCK_M (``row_max``, ``col_max``); the chunks' log2-sum-exp ranges
    (``lse_stats``) let the schedule check their spread. Queries and keys keep a and b for the query
    kernel (which applies g after its products) and add the key kernel's weights. ``scales``: the
    prescale, and for queries and keys the query kernel's column prescale."""
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    inside = rows < n
    source = tl.load(plan_ptr + F_PERM * n_pad + rows)
    contributing = tl.load(plan_ptr + F_VALID * n_pad + rows) != 0
    label = tl.load(plan_ptr + F_LABEL * n_pad + rows)
    count = tl.maximum(tl.load(plan_ptr + F_N_POS * n_pad + rows), 1).to(tl.float32)
    g = tl.load(grad_ptr + source.to(tl.int64) * grad_stride, mask=inside & contributing, other=0.0).to(tl.float32)
    b = tl.where(contributing, 1.0 / count, 0.0)
    if EACH_POSITIVE:  # (the positive pass writes the contributing rows' sums only)
        a = tl.where(contributing, b * tl.load(pos_sigmoid_ptr + rows), 0.0)
    else:
        a = contributing.to(tl.float32)
    lse2 = tl.load(lse_ptr + rows)
    inv = tl.load(inv_ptr + rows)
    tl.store(out_ptr + W_LSE * n_pad + rows, tl.where(contributing, lse2, float("inf")))
    if SYMMETRIC:
        scale = _prescale(_largest(partials_ptr, partials, 1) * _largest(partials_ptr, partials, 0))
        a = a * g * scale
        b = b * g * scale
        valid_lse = tl.where(label >= 0, lse2, float("-inf"))
        row_tiles, row_max = _tile_max(valid_lse, BLOCK_N, BLOCK)
        col_tiles, col_max = _tile_max(valid_lse, BLOCK_M, BLOCK)
        tl.store(out_ptr + W_A * n_pad + rows, a)
        tl.store(out_ptr + W_B * n_pad + rows, b)
        tl.store(out_ptr + W_ALPHA * n_pad + rows, _spread_weight(a, row_max, lse2))
        tl.store(out_ptr + W_BETA * n_pad + rows, _spread_weight(a, col_max, lse2) * inv)
        row_index = pid * (BLOCK // BLOCK_N) + tl.arange(0, BLOCK // BLOCK_N)
        col_index = pid * (BLOCK // BLOCK_M) + tl.arange(0, BLOCK // BLOCK_M)
        tl.store(row_max_ptr + row_index, tl.where(row_tiles == float("-inf"), 0.0, row_tiles))
        tl.store(col_max_ptr + col_index, tl.where(col_tiles == float("-inf"), 0.0, col_tiles))
        chunks: tl.constexpr = BLOCK // CHUNK
        chunk_lse = tl.reshape(tl.where(label >= 0, lse2, float("inf")), (chunks, CHUNK))
        chunk_index = pid * chunks + tl.arange(0, chunks)
        tl.store(lse_stats_ptr + chunk_index, tl.min(chunk_lse, axis=1))
        tl.store(lse_stats_ptr + n_pad // CHUNK + chunk_index, tl.max(tl.reshape(valid_lse, (chunks, CHUNK)), axis=1))
        if pid == 0:
            tl.store(scales_ptr, scale)
    else:
        scale = _prescale(_largest(partials_ptr, partials, 2))
        row_weight = g * inv * scale
        tl.store(out_ptr + W_A * n_pad + rows, a)
        tl.store(out_ptr + W_B * n_pad + rows, b)
        tl.store(out_ptr + W_G * n_pad + rows, g)
        tl.store(out_ptr + W_A_KEY * n_pad + rows, a * row_weight)
        tl.store(out_ptr + W_B_KEY * n_pad + rows, b * row_weight)
        tl.store(out_ptr + W_Q_SCALE * n_pad + rows, inv * (LOG2E / tl.load(tau_ptr)))
        if pid == 0:
            tl.store(scales_ptr, scale)
            tl.store(scales_ptr + 1, _prescale(_largest(k_partials_ptr, k_partials, 0)))
