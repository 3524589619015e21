"""The plan of a call: rows sorted by (group, label), int32 ids, counts, and per-program tile lists.

A call's plan costs a few torch ops (one or two sorts a side) and a few launches of the kernels in
``_plan_kernels.py``, without a host synchronisation (no ``.item()``, no data-dependent shapes), so
a loss on the kernels never waits for the device. The forward makes it once and returns it for the
backward. Every plan kernel has a torch twin here: the reference the tests hold the kernels to, and
what runs where the kernels cannot (CPU tensors without Triton's interpreter).

**Order.** Each side's rows are sorted by (ignored last, group, label), stably: a label's sort key
is the label rotated so that ``ignore_index`` is the largest int64 (``label_keys``), a group's is
the group, or the largest int64 on an ignored row (``sort_keys``: two stable sorts, by label key,
then by group key). The kernels read the rows through the permutation (one gathered, padded (N, D)
copy per side) and write gradients back to the original rows, so the order is invisible to the
caller. Sorting puts a group's rows next to each other (its tiles meet only the tiles of the same
group) and a label's rows next to each other (a tile pair whose label ranges do not overlap holds no
positive pair).

**Ids.** Labels and groups become int32 ids shared by both sides: the number of rows of both sides
whose key sorts before the row's, found by binary search of the sorted keys (equal keys, equal ids;
the ids follow the sort). -1 marks an ignored or padding row (never a candidate) and the group
``SHARED_GROUP`` (it meets every group). The kernels compare ids with one 32-bit compare each.

**Counts.** Positive and candidate counts per query come from binary searches of the sorted keys,
not from the tile loop.

**Tile categories.** For a pair of a query tile and a key tile:

- *skip*: no pair in it is a candidate (no valid row on a side, or groups that cannot meet);
- *clean*: every pair is a candidate and none is a positive: every key valid, one group (or
  SHARED) on both sides, no query's own key in it, label ranges apart. The kernels run these
  through a loop without any mask;
- *positive*: every pair is a candidate, and positives may be among them (label ranges overlap):
  one label compare per element;
- *masked*: the rest (ignored or padding keys, a group boundary, a query's own key), run through a
  loop that rebuilds every mask element by element.

They come from statistics of 16-row chunks (``CHUNK``) that the rows kernel writes, combined per
tile of any size: whether a chunk holds valid rows, only valid rows, SHARED or grouped rows, its
label and group ranges, and the range of its queries' own keys (a tile pair holds an own key where a
chunk's range reaches into the key tile: exact in self-contrast, at most a few tiles more where
own keys are scattered). Per program (a tile of the side the kernel owns) the other side's tiles
are listed clean first, then positive, then masked (``order``), with the three counts (``counts``);
the kernels loop over those lists, so no branch surrounds a load and skipped tiles cost nothing.
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
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)
_BIG = 2**31 - 1

# The plan of one side: an int32 tensor, a row per field and a column per padded row (each field
# contiguous, as the kernels read it). The queries' has QUERY_FIELDS rows, the keys' KEY_FIELDS.
PERM, LABEL, GROUP, STATS, SELF, N_POS, VALID = range(7)
QUERY_FIELDS, KEY_FIELDS = 7, 4
# The STATS row holds STAT_FIELDS rows of n_pad / CHUNK entries, one per 16-row chunk.
CHUNK = 16
STAT_FLAGS, STAT_LABEL_LO, STAT_LABEL_HI, STAT_GROUP_LO, STAT_GROUP_HI, STAT_SELF_LO, STAT_SELF_HI = range(7)
STAT_FIELDS = 7
ANY_VALID, ALL_VALID, ANY_SHARED, ANY_GROUPED = 1, 2, 4, 8
# The per-row outputs of the backward's rows kernel (_plan_kernels.W_*).
W_LSE, W_A, W_B, W_ALPHA, W_BETA = range(5)
W_G, W_A_KEY, W_B_KEY, W_Q_SCALE = range(3, 7)
SYMMETRIC_WEIGHTS, QUERY_KEY_WEIGHTS = 5, 7


def padded_rows(n: int) -> int:
    return max(ROW_PAD, -(-n // ROW_PAD) * ROW_PAD)


def steps(n: int) -> int:
    """Halvings of a binary search over n sorted keys."""
    return max(1, (n + 1).bit_length())


# ----------------------------------------------------------------------------- order


def _wrapped(value: int) -> int:
    return (value + 2**63) % 2**64 - 2**63


def label_keys(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """int64 sort keys of labels: ``ignore_index`` becomes the largest (its rows sort last), the others
    keep their order from ignore_index + 1 on, wrapping around (one add)."""
    return labels + _wrapped(INT64_MAX - ignore_index)


class Keys(NamedTuple):
    """One side's sort: the permutation and its keys."""

    perm: torch.Tensor  # (n,) int64: sorted position -> original row
    lk: torch.Tensor  # (n,) int64 label keys, in the caller's order
    lv: torch.Tensor  # (n,) the label keys sorted
    gk: torch.Tensor | None  # (n,) int64 group keys (INT64_MAX on ignored rows), in the caller's order
    gv: torch.Tensor | None  # (n,) the group keys in the sorted order


def sort_keys(labels: torch.Tensor, groups: torch.Tensor | None, ignore_index: int) -> Keys:
    """Sort one side by (group key, label key), stably: one sort without groups, two with."""
    lk = label_keys(labels, ignore_index)
    lv, perm = torch.sort(lk, stable=True)
    if groups is None:
        return Keys(perm, lk, lv, None, None)
    gk = groups.masked_fill(lk == INT64_MAX, INT64_MAX)
    gv, by_group = torch.sort(gk[perm], stable=True)
    return Keys(perm[by_group], lk, lv, gk, gv)


# ----------------------------------------------------------------------------- rows (torch twins)


def _search_rows(keys: Keys, g: torch.Tensor | None, lab: torch.Tensor, index: torch.Tensor | None,
                 upper: bool = False) -> torch.Tensor:
    """The first sorted row whose (group key, label key[, original row]) is > (upper) or >= the given
    one: a binary search, as the kernels run it (_plan_kernels._search_rows)."""
    n = keys.perm.numel()
    lo = torch.zeros_like(lab)
    hi = torch.full_like(lab, n)
    label_sorted = keys.lv if keys.gv is None else keys.lk[keys.perm]
    for _ in range(steps(n)):
        active = lo < hi
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        at = mid.clamp(max=max(n - 1, 0))
        key = label_sorted[at] if n else lab
        if index is not None:
            row = keys.perm[at] if n else index
            after = (key < lab) | ((key == lab) & (row < index))
        else:
            after = key <= lab if upper else key < lab
        if keys.gv is not None:
            group = keys.gv[at] if n else g
            after = (group < g) | ((group == g) & after)
        lo = torch.where(active & after, mid + 1, lo)
        hi = torch.where(active & ~after, mid, hi)
    return lo


def _count_rows(keys: Keys, g, lab) -> torch.Tensor:
    return _search_rows(keys, g, lab, None, upper=True) - _search_rows(keys, g, lab, None)


def chunk_stats(label: torch.Tensor, group: torch.Tensor, self_col: torch.Tensor) -> torch.Tensor:
    """(STAT_FIELDS, rows / CHUNK) int32 statistics of 16-row chunks of sorted ids."""
    label, group, self_col = (x.view(-1, CHUNK) for x in (label, group, self_col))
    valid = label >= 0
    grouped = valid & (group >= 0)
    owns = self_col >= 0
    flags = (valid.any(1) * ANY_VALID + valid.all(1) * ALL_VALID + (valid & (group < 0)).any(1) * ANY_SHARED
             + grouped.any(1) * ANY_GROUPED)
    big = torch.full_like(label, _BIG)
    none = torch.full_like(label, -1)
    return torch.stack([flags.to(torch.int32),
                        torch.where(valid, label, big).amin(1), torch.where(valid, label, none).amax(1),
                        torch.where(grouped, group, big).amin(1), torch.where(grouped, group, none).amax(1),
                        torch.where(owns, self_col, big).amin(1), torch.where(owns, self_col, none).amax(1)])


def _ids(keys: Keys, other: Keys | None, n_pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source rows, label ids, group ids) of one side's sorted rows, padded to n_pad."""
    n = keys.perm.numel()
    pad = n_pad - n
    lab = keys.lk[keys.perm]
    valid = lab != INT64_MAX
    label = torch.searchsorted(keys.lv, lab)
    if other is not None:
        label = label + torch.searchsorted(other.lv, lab)
    label = torch.where(valid, label, -1)
    if keys.gv is not None:
        group = torch.searchsorted(keys.gv, keys.gv)
        if other is not None:
            group = group + torch.searchsorted(other.gv, keys.gv)
        group = torch.where(keys.gv == SHARED_GROUP, -1, group)
        group = torch.where(valid, group, 0)
    else:
        group = torch.zeros_like(label)
    as_rows = lambda x, value: torch.nn.functional.pad(x.to(torch.int32), (0, pad), value=value)  # noqa: E731
    return as_rows(keys.perm, 0), as_rows(label, -1), as_rows(group, 0)


def rows(q: Keys, k: Keys | None, self_key_offset: int | None, negatives: bool,
         pos_block: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The torch twin of ``plan_rows_kernel`` on both sides: (the queries' plan, the keys' plan (empty in
    self-contrast: ``k`` None), the contributing flags in the caller's order, each_positive's chunk
    starts (``pos_block``: the positive pass's BLOCK_N) or None)."""
    n = q.perm.numel()
    n_pad = padded_rows(n)
    symmetric = k is None
    keys = q if symmetric else k
    perm, label, group = _ids(q, k, n_pad)
    lab = q.lk[q.perm]
    valid = lab != INT64_MAX
    g = q.gv if q.gv is not None else torch.zeros_like(lab)
    n_keys = torch.searchsorted(keys.lv, torch.full_like(lab, INT64_MAX))
    same_label = torch.searchsorted(keys.lv, lab, right=True) - torch.searchsorted(keys.lv, lab)
    if q.gv is not None:
        shared = torch.full_like(g, SHARED_GROUP)
        first, last = torch.full_like(lab, INT64_MIN), torch.full_like(lab, INT64_MAX)
        positives = _count_rows(keys, g, lab) + _count_rows(keys, shared, lab)
        candidates = (_search_rows(keys, g, last, None) - _search_rows(keys, g, first, None)
                      + _search_rows(keys, shared, last, None) - _search_rows(keys, shared, first, None))
        positives = torch.where(g == SHARED_GROUP, same_label, positives)
        candidates = torch.where(g == SHARED_GROUP, n_keys, candidates)
    else:
        positives, candidates = same_label, n_keys
    self_col = torch.full((n_pad,), -1, dtype=torch.int32, device=lab.device)
    if self_key_offset is not None:
        if symmetric:
            self_col[:n] = torch.arange(n, dtype=torch.int32, device=lab.device)
            own_candidate = own_positive = valid
        else:
            own = q.perm + self_key_offset
            own_lab = k.lk[own]
            own_candidate = valid & (own_lab != INT64_MAX)
            own_g = torch.zeros_like(own_lab)
            if q.gv is not None:
                own_g = k.gk[own]
                own_candidate &= (g == SHARED_GROUP) | (own_g == SHARED_GROUP) | (own_g == g)
            own_positive = own_candidate & (own_lab == lab)
            self_col[:n] = _search_rows(k, own_g if q.gv is not None else None, own_lab, own).to(torch.int32)
        positives = positives - own_positive.to(positives.dtype)
        candidates = candidates - own_candidate.to(candidates.dtype)
    positives = torch.where(valid, positives, 0)
    candidates = torch.where(valid, candidates, 0)
    contributing = positives > 0
    if negatives:
        contributing &= candidates > positives
    out_valid = torch.empty(n, dtype=torch.bool, device=lab.device)
    out_valid[q.perm] = contributing
    pad = lambda x: torch.nn.functional.pad(x.to(torch.int32), (0, n_pad - n))  # noqa: E731
    starts = None if pos_block is None else pad(chunk_starts(q, valid, pos_block))
    q_plan = torch.stack([perm, label, group, _stats_row(label, group, self_col), self_col, pad(positives),
                          pad(contributing)])
    if symmetric:
        k_plan = q_plan.new_empty(0, 0)
    else:
        m_pad = padded_rows(k.perm.numel())
        k_perm, k_label, k_group = _ids(k, q, m_pad)
        k_plan = torch.stack([k_perm, k_label, k_group, _stats_row(k_label, k_group, torch.full_like(k_label, -1))])
    return q_plan, k_plan, out_valid, starts


def _stats_row(label, group, self_col) -> torch.Tensor:
    stats = chunk_stats(label, group, self_col).flatten()
    return torch.nn.functional.pad(stats, (0, label.numel() - stats.numel()))


def chunk_starts(q: Keys, valid: torch.Tensor, block: int) -> torch.Tensor:
    """Where the chunks of each_positive's positive pass start, per sorted query (the torch twin of
    _plan_kernels._chunk_starts). Chunks of at most ``block`` rows never cross a group: a chunk starts
    at a group's first row, at the first row of a (group, label) segment of at least ``block`` rows
    and at the first row after one, and every ``block`` rows from there (a large segment's rows) or
    from the group's first row (runs of smaller segments, which share chunks)."""
    n = q.perm.numel()
    index = torch.arange(n, device=q.perm.device)
    lab = q.lk[q.perm]
    g = q.gv
    segment_lo = _search_rows(q, g, lab, None)
    segment_hi = _search_rows(q, g, lab, None, upper=True)
    large = segment_hi - segment_lo >= block
    group_first = torch.searchsorted(q.gv, q.gv) if g is not None else torch.zeros_like(index)
    previous = (index - 1).clamp_min(0)
    prev_lo = _search_rows(q, None if g is None else g[previous], lab[previous], None)
    group_start = index == group_first
    segment_start = index == segment_lo
    after_large = segment_start & ~group_start & (index - prev_lo >= block)
    anchor = torch.where(large, segment_lo, group_first)
    return valid & (group_start | (segment_start & (large | after_large)) | ((index - anchor) % block == 0))


def positive_chunks(q: Keys, k: Keys | None, starts: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch twin of ``plan_chunks_kernel``: the chunks of each_positive's positive pass
    (``info_nce_fwd_positive_kernel``), a (rows, 7) int32 table, per chunk the sorted query rows
    [start, end) it owns, two key ranges [lo_a, hi_a), [lo_b, hi_b) that hold every positive of those
    rows, and ``exact``: 1 where every key of the ranges is a positive of every row (one label, not
    SHARED), so the kernel needs no label compare; and the number of chunks (a one-element int32
    tensor: no host synchronisation). The ranges: the keys of the chunk's group whose labels lie
    between its first and last label, and the SHARED keys of those labels (a SHARED chunk: every
    valid key). Rows of the table past the last chunk are 0."""
    keys = q if k is None else k
    n = q.perm.numel()
    n_pad = starts.numel()
    device = starts.device
    slots = torch.cumsum(starts, 0, dtype=torch.int32)
    index = torch.arange(n_pad, device=device)
    is_start = starts != 0
    n_valid = torch.searchsorted(q.lv, torch.tensor([INT64_MAX], device=device))
    # The next start after each row, at most block rows on.
    later = torch.where(is_start, index, n_pad).flip(0).cummin(0).values.flip(0)
    following = torch.cat([later[1:], later.new_full((1,), n_pad)])
    end = torch.minimum(torch.minimum(following, n_valid), index + block)
    lab = torch.nn.functional.pad(q.lk[q.perm], (0, n_pad - n), value=INT64_MAX)
    first, last = lab, lab[(end - 1).clamp(0, n_pad - 1)]
    exact = first == last
    empty = torch.zeros_like(index)
    if q.gv is not None:
        g = torch.nn.functional.pad(q.gv, (0, n_pad - n))
        shared = g == SHARED_GROUP
        lo_a, hi_a = _search_rows(keys, g, first, None), _search_rows(keys, g, last, None, upper=True)
        shared_g = torch.full_like(g, SHARED_GROUP)
        lo_b, hi_b = _search_rows(keys, shared_g, first, None), _search_rows(keys, shared_g, last, None, upper=True)
        n_keys = torch.searchsorted(keys.lv, torch.tensor([INT64_MAX], device=device))
        lo_a, hi_a = torch.where(shared, 0, lo_a), torch.where(shared, n_keys, hi_a)
        lo_b, hi_b = torch.where(shared, 0, lo_b), torch.where(shared, 0, hi_b)
        exact &= ~shared
    else:
        lo_a, hi_a = torch.searchsorted(keys.lv, first), torch.searchsorted(keys.lv, last, right=True)
        lo_b, hi_b = empty, empty
    entries = torch.stack([index, end, lo_a, hi_a, lo_b, hi_b, exact.to(torch.int64)], 1).to(torch.int32)
    table = torch.zeros(n_pad, 7, dtype=torch.int32, device=device)
    table[slots[is_start].long() - 1] = entries[is_start]
    return table, slots[-1:]


# ----------------------------------------------------------------------------- tiles (torch twins)


class TileStats(NamedTuple):
    any_valid: torch.Tensor
    all_valid: torch.Tensor
    label_lo: torch.Tensor
    label_hi: torch.Tensor
    group_lo: torch.Tensor
    group_hi: torch.Tensor
    any_shared: torch.Tensor
    any_grouped: torch.Tensor


def stats_of(plan: torch.Tensor) -> torch.Tensor:
    """The (STAT_FIELDS, n_pad / CHUNK) statistics in a side's plan."""
    n_pad = plan.shape[1]
    return plan[STATS, : STAT_FIELDS * (n_pad // CHUNK)].view(STAT_FIELDS, n_pad // CHUNK)


def tile_stats(stats: torch.Tensor, block: int) -> TileStats:
    """The statistics of tiles of ``block`` rows from their chunks'."""
    s = stats.view(STAT_FIELDS, -1, block // CHUNK)
    flags = s[STAT_FLAGS]
    return TileStats(((flags & ANY_VALID) != 0).any(1), ((flags & ALL_VALID) != 0).all(1),
                     s[STAT_LABEL_LO].amin(1), s[STAT_LABEL_HI].amax(1), s[STAT_GROUP_LO].amin(1),
                     s[STAT_GROUP_HI].amax(1), ((flags & ANY_SHARED) != 0).any(1), ((flags & ANY_GROUPED) != 0).any(1))


def categories(q_plan: torch.Tensor, k_plan: torch.Tensor, block_n: int, block_m: int, has_groups: bool,
               has_self: bool, both_valid: bool = False, lse_stats: torch.Tensor | None = None) -> torch.Tensor:
    """(query tiles, key tiles) int8: SKIP, MASKED, POSITIVE or CLEAN for tiles of block_n queries and
    block_m keys (the torch twin of ``plan_schedule_kernel``'s categories).

    ``both_valid``: clean and positive tiles also need every query valid (the symmetric backward
    uses each pair in both directions). ``lse_stats`` (the symmetric backward): the chunks' smallest
    and largest log2-sum-exp; a clean or positive pair also needs every row's within
    SYMMETRIC_SPREAD of each tile's largest and of the column tile's largest."""
    q_stats, k_stats = stats_of(q_plan), stats_of(k_plan)
    q, k = tile_stats(q_stats, block_n), tile_stats(k_stats, block_m)
    col = lambda x: x[None, :]  # noqa: E731
    row = lambda x: x[:, None]  # noqa: E731
    meets = row(q.any_valid) & col(k.any_valid)
    unmasked = col(k.all_valid).expand_as(meets)
    if both_valid:
        unmasked = unmasked & row(q.all_valid)
    if has_groups:
        overlap = (row(q.group_lo) <= col(k.group_hi)) & (col(k.group_lo) <= row(q.group_hi))
        meets &= row(q.any_shared) | col(k.any_shared) | overlap
        lo = torch.minimum(row(q.group_lo), col(k.group_lo))
        hi = torch.maximum(row(q.group_hi), col(k.group_hi))
        unmasked = unmasked & (~row(q.any_grouped) | ~col(k.any_grouped) | (lo == hi))
    if has_self:
        chunks = q_stats.view(STAT_FIELDS, -1, block_n // CHUNK)
        first = torch.arange(meets.shape[1], device=meets.device) * block_m
        self_lo, self_hi = chunks[STAT_SELF_LO][:, None, :], chunks[STAT_SELF_HI][:, None, :]
        diagonal = ((self_lo < first[None, :, None] + block_m) & (self_hi >= first[None, :, None])).any(2)
        unmasked = unmasked & ~diagonal
    unmasked = unmasked & meets
    if lse_stats is not None:
        lo, hi = lse_stats.view(2, -1)
        row_lo, row_hi = lo.view(-1, block_n // CHUNK).amin(1), hi.view(-1, block_n // CHUNK).amax(1)
        col_lo, col_hi = lo.view(-1, block_m // CHUNK).amin(1), hi.view(-1, block_m // CHUNK).amax(1)
        unmasked = unmasked & ((col(col_hi) - row(row_lo)) <= SYMMETRIC_SPREAD) & (
            row(row_hi - row_lo) <= SYMMETRIC_SPREAD) & (col(col_hi - col_lo) <= SYMMETRIC_SPREAD)
    apart = (row(q.label_hi) < col(k.label_lo)) | (col(k.label_hi) < row(q.label_lo))
    cat = meets.to(torch.int8) * MASKED
    return torch.where(unmasked, torch.where(apart, CLEAN, POSITIVE).to(torch.int8), cat)


class Schedule(NamedTuple):
    order: torch.Tensor  # (programs, other tiles) int32: clean tiles, positive, masked (then unspecified)
    counts: torch.Tensor  # (programs, 3) int32: number of clean, positive and masked tiles


def schedule(cat: torch.Tensor) -> Schedule:
    """Per row of ``cat`` (one program), the column tiles to visit: clean, positive, then masked."""
    order = torch.sort(cat, dim=1, descending=True, stable=True).indices.to(torch.int32)
    counts = torch.stack([(cat == kind).sum(1) for kind in (CLEAN, POSITIVE, MASKED)], 1).to(torch.int32)
    return Schedule(order.contiguous(), counts)


# ----------------------------------------------------------------------------- the backward's rows


def _pow2_prescale(largest: torch.Tensor) -> torch.Tensor:
    """A power of two that brings ``largest`` (>= 0, a device scalar) to about 2^13; 1 for 0. 2^13 leaves
    2^2 of headroom under fp16's 65504 for the sum of up to four terms (symmetric kernel), and keeps
    probabilities of 2^-30 normal."""
    exponent = 13.0 - torch.ceil(torch.log2(largest.clamp_min(1e-30)))
    return torch.where(largest > 0, torch.exp2(exponent.clamp(-100.0, 100.0)), 1.0).reshape(1)


def _spread_weight(a: torch.Tensor, tile_max: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """a 2^(tile max - lse2), 0 where a is 0, the exponent clamped to [0, 126]."""
    exponent = torch.nan_to_num((tile_max - lse2).clamp(0.0, 126.0), nan=0.0)
    return torch.where(a == 0, 0.0, a * torch.exp2(exponent))


def backward_rows(grad_loss: torch.Tensor, q_plan: torch.Tensor, n: int, lse2: torch.Tensor,
                  pos_sigmoid: torch.Tensor, inv: torch.Tensor, k_inv: torch.Tensor | None, tau: torch.Tensor,
                  each_positive: bool, symmetric: bool, block_n: int, block_m: int):
    """The torch twin of ``gather_partials_kernel``'s maxima and ``backward_rows_kernel``: (weights
    (W rows of n_pad), row_max, col_max, lse_stats, scales); see the kernel."""
    n_pad = lse2.numel()
    contributing = q_plan[VALID] != 0
    g = torch.zeros(n_pad, dtype=torch.float32, device=lse2.device)
    g[:n] = grad_loss.to(torch.float32)[q_plan[PERM, :n].long()]
    g = torch.where(contributing, g, 0.0)
    b = torch.where(contributing, 1.0 / q_plan[N_POS].clamp_min(1).to(torch.float32), 0.0)
    a = torch.where(contributing, b * pos_sigmoid, 0.0) if each_positive else contributing.to(torch.float32)
    lse_masked = torch.where(contributing, lse2, float("inf"))
    if symmetric:
        scale = _pow2_prescale(g.abs().amax() * inv.amax())
        a, b = a * g * scale, b * g * scale
        valid_lse = torch.where(q_plan[LABEL] >= 0, lse2, float("-inf"))
        row_tiles, col_tiles = valid_lse.view(-1, block_n).amax(1), valid_lse.view(-1, block_m).amax(1)
        alpha = _spread_weight(a, row_tiles.repeat_interleave(block_n, output_size=n_pad), lse2)
        beta = _spread_weight(a, col_tiles.repeat_interleave(block_m, output_size=n_pad), lse2) * inv
        chunks = torch.where(q_plan[LABEL] >= 0, lse2, float("inf")).view(-1, CHUNK).amin(1)
        lse_stats = torch.cat([chunks, valid_lse.view(-1, CHUNK).amax(1)])
        weights = torch.stack([lse_masked, a, b, alpha, beta])
        return (weights, torch.nan_to_num(row_tiles, neginf=0.0), torch.nan_to_num(col_tiles, neginf=0.0), lse_stats,
                scale)
    scale = _pow2_prescale((g * inv).abs().amax())
    row_weight = g * inv * scale
    weights = torch.stack([lse_masked, a, b, g, a * row_weight, b * row_weight, inv * (1.4426950408889634 / tau)])
    return weights, None, None, None, torch.cat([scale, _pow2_prescale(k_inv.amax())])
