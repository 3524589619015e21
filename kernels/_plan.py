"""Host side of the tile loop: rows sorted by (group, label), dense int32 ids, and per-program tile lists.

Everything here is O(N + M) or O(tiles²) device work in torch, without a host synchronisation
(no ``.item()``, no data-dependent shapes), so a loss on the kernels never waits for the device.

**Order.** Each side's rows are sorted by (ignored last, group, label), stably. The kernels read
the rows through the permutation (one gathered, padded (N, D) copy per side) and write gradients
back to the original rows, so the order is invisible to the caller. Sorting puts a group's rows
next to each other (its tiles meet only the tiles of the same group) and a label's rows next to
each other (a tile pair whose label ranges do not overlap holds no positive pair).

**Ids.** Labels and groups become dense int32 ranks, shared between queries and keys: a label of
-1 marks an ignored row or a padding row (never a candidate), a group of -1 is ``SHARED_GROUP``
(meets every group). The kernels compare them with one 32-bit compare each.

**Tile categories.** For a pair of a query tile and a key tile:

- *skip*: no pair in it is a candidate (no valid row on a side, or groups that cannot meet);
- *clean*: every pair is a candidate and none is a positive: every key valid, one group (or
  SHARED) on both sides, no query's own key in it, label ranges apart. The kernels run these
  through a loop without any mask;
- *positive*: every pair is a candidate, and positives may be among them (label ranges overlap):
  one label compare per element;
- *masked*: the rest (ignored or padding keys, a group boundary, a query's own key), run through a
  loop that rebuilds every mask element by element.

Per program (a tile of the side the kernel owns) the other side's tiles are listed clean first,
then positive, then masked (``order``), with the three counts (``counts``); the kernels loop over
those lists, so no branch surrounds a load and skipped tiles cost nothing.

**Counts.** Positive and candidate counts per query come from histograms of the sorted keys
(``pair_counts``), not from the tile loop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SHARED_GROUP = -1
"""The group id that matches every group: a key of it is a candidate of every query, and a query of it
meets every key (``contrastkit.SHARED`` is the same id)."""

ROW_PAD = 128  # rows of the gathered copies are padded to a multiple of the largest tile side
POSITIVE_TAIL = 64  # rows behind a gathered copy: the positive pass's key tiles (BLOCK_M <= 64) read them
SKIP, MASKED, POSITIVE, CLEAN = 0, 1, 2, 3
# Symmetric backward: largest spread of log2-sum-exp (in log2 units) inside a clean tile pair (see
# docs/kernels.md: one exponential per element is exact as long as 2**-(24 + SPREAD) stays a normal
# float32 and the row weights times 2**SPREAD stay finite).
SYMMETRIC_SPREAD = 64.0


def padded_rows(n: int) -> int:
    return max(ROW_PAD, -(-n // ROW_PAD) * ROW_PAD)


class Side(NamedTuple):
    """One side (queries or keys) in sorted order."""

    perm: torch.Tensor  # (n,) int64: sorted position -> original row
    label: torch.Tensor  # (n_pad,) int32: dense label >= 0; -1 ignored or padding
    group: torch.Tensor | None  # (n_pad,) int32: dense group >= 0; -1 SHARED


class Plan(NamedTuple):
    q: Side
    k: Side  # the same object as q in symmetric self-contrast
    self_col: torch.Tensor | None  # (n_pad,) int32: sorted key index of each sorted query's own key, -1 none
    symmetric: bool


def _dense(values: torch.Tensor) -> torch.Tensor:
    """Dense int64 ranks of ``values`` (equal values, equal ranks), without a synchronisation."""
    if values.numel() == 0:
        return values.clone()
    sorted_values, index = values.sort()
    new = torch.ones_like(sorted_values, dtype=torch.bool)
    new[1:] = sorted_values[1:] != sorted_values[:-1]
    ranks = torch.empty_like(values)
    ranks[index] = new.cumsum(0) - 1
    return ranks


def _joint_dense(a: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if b is None:
        return _dense(a), None
    ranks = _dense(torch.cat([a, b]))
    return ranks[: a.numel()], ranks[a.numel():]


def _side(label: torch.Tensor, group: torch.Tensor | None, ignored: torch.Tensor) -> Side:
    """Sort one side by (ignored last, group, label) and pad its ids."""
    n = label.numel()
    # One int64 key: ignored (bit 62), group + 1 (SHARED -> 0; bits 31..61), label (bits 0..30);
    # ignored rows keep their order.
    key = torch.where(ignored, 0, label)
    if group is not None:
        key = key | torch.where(ignored, 0, group + 1) << 31
    key = key | ignored.to(torch.int64) << 62
    perm = torch.sort(key, stable=True).indices
    pad = padded_rows(n) - n
    sorted_label = torch.where(ignored, -1, label)[perm].to(torch.int32)
    out_label = torch.nn.functional.pad(sorted_label, (0, pad), value=-1)
    out_group = None if group is None else torch.nn.functional.pad(group[perm].to(torch.int32), (0, pad), value=0)
    return Side(perm, out_label, out_group)


def make_plan(labels, key_labels, groups, key_groups, ignore_index: int, self_key_offset: int | None,
              symmetric: bool) -> Plan:
    """The sorted order and dense ids of one call (``symmetric``: self-contrast, keys are the queries)."""
    q_ignored = labels == ignore_index
    q_label, k_label = _joint_dense(labels, None if symmetric else key_labels)
    q_group = k_group = None
    if groups is not None:
        q_group, k_group = _joint_dense(groups, None if symmetric else key_groups)
        q_group = torch.where(groups == SHARED_GROUP, -1, q_group)
        if not symmetric:
            k_group = torch.where(key_groups == SHARED_GROUP, -1, k_group)
    q = _side(q_label, q_group, q_ignored)
    k = q if symmetric else _side(k_label, k_group, key_labels == ignore_index)
    self_col = None
    if self_key_offset is not None:
        if symmetric:
            self_col = torch.arange(q.label.numel(), dtype=torch.int32, device=labels.device)
        else:
            inverse = torch.empty_like(k.perm)
            inverse[k.perm] = torch.arange(k.perm.numel(), device=labels.device)
            self_col = inverse[q.perm + self_key_offset].to(torch.int32)
        pad = q.label.numel() - q.perm.numel()
        self_col = torch.nn.functional.pad(self_col[: q.perm.numel()], (0, pad), value=-1)
    return Plan(q, k, self_col, symmetric)


# ----------------------------------------------------------------------------- tiles


class TileStats(NamedTuple):
    any_valid: torch.Tensor
    all_valid: torch.Tensor
    label_lo: torch.Tensor
    label_hi: torch.Tensor
    group_lo: torch.Tensor | None  # over valid rows of a real (not SHARED) group
    group_hi: torch.Tensor | None
    any_shared: torch.Tensor | None
    any_grouped: torch.Tensor | None


_BIG = 2**31 - 1


def tile_stats(label: torch.Tensor, group: torch.Tensor | None, block: int) -> TileStats:
    label = label.view(-1, block)
    valid = label >= 0
    stats = dict(any_valid=valid.any(1), all_valid=valid.all(1),
                 label_lo=torch.where(valid, label, _BIG).amin(1), label_hi=torch.where(valid, label, -1).amax(1),
                 group_lo=None, group_hi=None, any_shared=None, any_grouped=None)
    if group is not None:
        group = group.view(-1, block)
        grouped = valid & (group >= 0)
        stats.update(group_lo=torch.where(grouped, group, _BIG).amin(1),
                     group_hi=torch.where(grouped, group, -1).amax(1),
                     any_shared=(valid & (group < 0)).any(1), any_grouped=grouped.any(1))
    return TileStats(**stats)


def categories(plan: Plan, block_n: int, block_m: int, both_valid: bool = False) -> torch.Tensor:
    """(query tiles, key tiles) int8: SKIP, MASKED, POSITIVE or CLEAN for tiles of block_n queries and
    block_m keys.

    ``both_valid``: clean and positive tiles also need every query valid (the symmetric backward
    uses each pair in both directions)."""
    q = tile_stats(plan.q.label, plan.q.group, block_n)
    k = tile_stats(plan.k.label, plan.k.group, block_m)
    col = lambda x: x[None, :]  # noqa: E731
    row = lambda x: x[:, None]  # noqa: E731
    meets = row(q.any_valid) & col(k.any_valid)
    unmasked = col(k.all_valid)
    if both_valid:
        unmasked = unmasked & row(q.all_valid)
    if q.group_lo is not None:
        overlap = (row(q.group_lo) <= col(k.group_hi)) & (col(k.group_lo) <= row(q.group_hi))
        meets &= row(q.any_shared) | col(k.any_shared) | overlap
        lo = torch.minimum(row(q.group_lo), col(k.group_lo))
        hi = torch.maximum(row(q.group_hi), col(k.group_hi))
        unmasked = unmasked & (~row(q.any_grouped) | ~col(k.any_grouped) | (lo == hi))
    if plan.self_col is not None:
        # Rows without an own key mark a spare column: no boolean indexing (a host synchronisation).
        key_tiles = meets.shape[1]
        tiles = torch.arange(plan.self_col.numel(), device=meets.device) // block_n
        cols = torch.where(plan.self_col >= 0, plan.self_col // block_m, key_tiles).long()
        diagonal = meets.new_zeros(meets.shape[0], key_tiles + 1)
        diagonal[tiles, cols] = True
        unmasked = unmasked & ~diagonal[:, :key_tiles]
    unmasked = unmasked & meets
    apart = (row(q.label_hi) < col(k.label_lo)) | (col(k.label_hi) < row(q.label_lo))
    cat = meets.to(torch.int8) * MASKED
    cat = torch.where(unmasked, torch.where(apart, CLEAN, POSITIVE).to(torch.int8), cat)
    return cat


def _lse_range(plan: Plan, lse2: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = (plan.q.label >= 0).view(-1, block)
    lse2 = lse2.view(-1, block)
    return (torch.where(valid, lse2, float("inf")).amin(1), torch.where(valid, lse2, float("-inf")).amax(1))


def symmetric_categories(plan: Plan, block_n: int, block_m: int, lse2: torch.Tensor) -> torch.Tensor:
    """Categories of the symmetric backward (row tiles of block_n, column tiles of block_m): a clean or
    positive pair also needs the log2-sum-exp (``lse2``: per sorted row, log2 units) of every row of
    both tiles within SYMMETRIC_SPREAD of each tile's largest and of the column tile's largest."""
    cat = categories(plan, block_n, block_m, both_valid=True)
    row_lo, row_hi = _lse_range(plan, lse2, block_n)
    col_lo, col_hi = _lse_range(plan, lse2, block_m)
    spread_ok = (((col_hi[None, :] - row_lo[:, None]) <= SYMMETRIC_SPREAD)
                 & ((row_hi - row_lo) <= SYMMETRIC_SPREAD)[:, None] & ((col_hi - col_lo) <= SYMMETRIC_SPREAD)[None, :])
    demote = (cat >= POSITIVE) & ~spread_ok
    return torch.where(demote, torch.full_like(cat, MASKED), cat)


def tile_max(plan: Plan, lse2: torch.Tensor, block: int) -> torch.Tensor:
    """Largest log2-sum-exp of the valid rows of each tile of ``block`` rows (-inf for none)."""
    return _lse_range(plan, lse2, block)[1]


class Schedule(NamedTuple):
    order: torch.Tensor  # (programs, other tiles) int32: clean tiles, positive, masked, then the rest
    counts: torch.Tensor  # (programs, 3) int32: number of clean, positive and masked tiles


def schedule(cat: torch.Tensor) -> Schedule:
    """Per row of ``cat`` (one program), the column tiles to visit: clean, positive, then masked."""
    order = torch.sort(cat, dim=1, descending=True, stable=True).indices.to(torch.int32)
    counts = torch.stack([(cat == kind).sum(1) for kind in (CLEAN, POSITIVE, MASKED)], 1).to(torch.int32)
    return Schedule(order.contiguous(), counts)


def positive_chunks(plan: Plan, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunks of each_positive's positive pass (``info_nce_fwd_positive_kernel``): a (rows, 7)
    int32 table, per chunk the sorted query rows [start, end) it owns, two key ranges [lo_a, hi_a),
    [lo_b, hi_b) that hold every positive of those rows, and ``exact``: 1 where every key of the
    ranges is a positive of every row (one label, not SHARED), so the kernel needs no label compare;
    and the number of chunks (a one-element int32 tensor: no host synchronisation).

    Chunks of at most ``block_n`` rows never cross a group. A (group, label) segment of at least
    ``block_n`` rows starts its own chunks, so its tiles line up with its own rows and keys instead of
    the grid; runs of smaller segments share chunks. The ranges: the keys of the chunk's group whose
    labels lie between its first and last label, and the SHARED keys of those labels (a SHARED
    chunk: every valid key). Rows of the table past the last chunk are 0."""
    label, group = plan.q.label, plan.q.group
    n = label.numel()
    device = label.device
    index = torch.arange(n, device=device)
    valid = label >= 0  # valid rows come first

    def changes(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.ones(1, dtype=torch.bool, device=device), x[1:] != x[:-1]])

    group_start = valid & changes(group) if group is not None else valid & (index == 0)
    segment_start = valid & changes(label) | group_start
    segment = (torch.cumsum(segment_start, 0) - 1).clamp_min(0)
    size = torch.zeros(n, dtype=torch.int64, device=device).scatter_add_(0, segment, valid.to(torch.int64))
    large = size[segment] >= block_n
    after_large = torch.cat([torch.zeros(1, dtype=torch.bool, device=device), large[:-1]])
    unit_start = group_start | (segment_start & (large | after_large))
    unit_first = torch.cummax(torch.where(unit_start, index, 0), 0).values
    chunk_start = valid & ((index - unit_first) % block_n == 0)
    chunk = torch.cumsum(chunk_start, 0) - 1
    spare = torch.full_like(index, n)
    start = torch.zeros(n + 1, dtype=torch.int64, device=device).scatter_(
        0, torch.where(chunk_start, chunk, spare), index)[:n]
    end = torch.zeros(n + 1, dtype=torch.int64, device=device).scatter_reduce_(
        0, torch.where(valid, chunk, spare), index + 1, reduce="amax")[:n]
    owns = end > start
    first = label[start].to(torch.int64)
    last = label[(end - 1).clamp_min(0)].to(torch.int64)

    k = plan.k
    k_valid = k.label >= 0
    big = torch.iinfo(torch.int64).max
    codes = k.label.to(torch.int64)
    if k.group is not None:
        codes = codes | (k.group.to(torch.int64) + 1) << 31
    codes = torch.where(k_valid, codes, big)  # sorted: the keys' sort order
    empty = torch.zeros_like(start)
    exact = first == last
    if group is None:
        lo_a, hi_a = _range(codes, first, last)
        lo_b, hi_b = empty, empty
    else:
        chunk_group = group[start].to(torch.int64)
        lo_a, hi_a = _range(codes, first | (chunk_group + 1) << 31, last | (chunk_group + 1) << 31)
        lo_b, hi_b = _range(codes, first, last)  # SHARED keys: group code 0
        shared = chunk_group < 0
        lo_a = torch.where(shared, 0, lo_a)
        hi_a = torch.where(shared, k_valid.sum(), hi_a)
        lo_b, hi_b = torch.where(shared, empty, lo_b), torch.where(shared, empty, hi_b)
        exact &= ~shared
    table = torch.stack([start, end, lo_a, hi_a, lo_b, hi_b, exact.to(torch.int64)], 1)
    count = chunk_start.sum().to(torch.int32).reshape(1)
    return torch.where(owns[:, None], table, 0).to(torch.int32).contiguous(), count


def _range(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[first index of a code >= lo, first index of a code > hi) in sorted ``codes``."""
    return torch.searchsorted(codes, lo, right=False), torch.searchsorted(codes, hi, right=True)


# ----------------------------------------------------------------------------- counts


def _count(sorted_values: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return (torch.searchsorted(sorted_values, values, right=True)
            - torch.searchsorted(sorted_values, values, right=False))


def pair_counts(plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, candidates) of every sorted query row, int32, from histograms of the sorted keys:
    O((N + M) log M), no tile loop. A query in group g meets the keys of g and the SHARED keys; a
    SHARED query meets every key; its own key (self_col) is taken out where it would count."""
    q, k = plan.q, plan.k
    big = torch.iinfo(torch.int64).max
    k_valid = k.label >= 0
    q_label = q.label.to(torch.int64)
    n_keys = k_valid.sum()
    # Valid keys come first, sorted by (group + 1, label): their codes are sorted, padding last.
    label_code = k.label.to(torch.int64)
    if k.group is None:
        positives = _count(torch.where(k_valid, label_code, big), q_label)
        candidates = n_keys.expand_as(positives)
    else:
        group_code = (k.group.to(torch.int64) + 1) << 31
        pair_codes = torch.where(k_valid, group_code | label_code, big)
        groups = torch.where(k_valid, group_code, big)
        q_group_code = (q.group.to(torch.int64) + 1) << 31
        shared = q.group < 0
        positives = _count(pair_codes, q_group_code | q_label) + _count(pair_codes, q_label)  # own group + SHARED
        candidates = _count(groups, q_group_code) + _count(groups, torch.zeros_like(q_group_code))
        by_label = torch.sort(torch.where(k_valid, label_code, big)).values
        positives = torch.where(shared, _count(by_label, q_label), positives)
        candidates = torch.where(shared, n_keys, candidates)
    if plan.self_col is not None:
        own = plan.self_col.long().clamp_min(0)
        is_candidate = (plan.self_col >= 0) & (k.label[own] >= 0)
        if k.group is not None:
            is_candidate &= (q.group < 0) | (k.group[own] < 0) | (q.group == k.group[own])
        candidates = candidates - is_candidate.to(candidates.dtype)
        positives = positives - (is_candidate & (k.label[own] == q.label)).to(positives.dtype)
    q_valid = q.label >= 0
    return (torch.where(q_valid, positives, 0).to(torch.int32), torch.where(q_valid, candidates, 0).to(torch.int32))


# ----------------------------------------------------------------------------- what the backward keeps

# A forward keeps its plan for the backward as one int32 tensor per side, a row per field and a column
# per padded row (each field contiguous, as the kernels read it): the queries' (QUERY_FIELDS, n_pad)
# and, unless the keys are the queries, the keys' (KEY_FIELDS, m_pad).
PERM, LABEL, GROUP, SELF, N_POS, VALID = range(6)
QUERY_FIELDS, KEY_FIELDS = 6, 3


def pack(plan: Plan, n_pos: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan with the queries' positive counts and contributing flags, as two int32 tensors (the
    keys' is empty in symmetric self-contrast)."""

    def side(s: Side, extra: list) -> torch.Tensor:
        n_pad = s.label.numel()
        perm = torch.nn.functional.pad(s.perm.to(torch.int32), (0, n_pad - s.perm.numel()))
        group = s.group if s.group is not None else torch.zeros_like(s.label)
        return torch.stack([perm, s.label, group, *extra])

    self_col = plan.self_col if plan.self_col is not None else torch.full_like(plan.q.label, -1)
    q = side(plan.q, [self_col, n_pos, valid.to(torch.int32)])
    k = plan.q.label.new_empty(0, 0) if plan.symmetric else side(plan.k, [])
    return q, k


def unpack(q: torch.Tensor, k: torch.Tensor, n: int, m: int, has_groups: bool, has_self: bool,
           symmetric: bool) -> tuple[Plan, torch.Tensor, torch.Tensor]:
    """The plan, positive counts and contributing flags (int32) of :func:`pack`, as views."""

    def side(t: torch.Tensor, rows: int) -> Side:
        return Side(t[PERM, :rows], t[LABEL], t[GROUP] if has_groups else None)

    q_side = side(q, n)
    k_side = q_side if symmetric else side(k, m)
    return Plan(q_side, k_side, q[SELF] if has_self else None, symmetric), q[N_POS], q[VALID]
