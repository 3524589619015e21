"""Triton kernels of the fused masked InfoNCE.

The launchers (``info_nce.py``) sort each side's rows by (group, label) and gather them into one
contiguous, zero-padded (rows, D_PAD) copy with the rows' inverse norms (``gather_rows_kernel``).
A program owns a tile of rows of one side and loops over tiles of the other side listed for it by
the plan (``_plan.py``), one loop per category: first the *clean* tiles, where every pair is a
candidate and no pair is a positive or a row with its own key, without any mask; then the
*positive* tiles, the same but with positives among the pairs, with one label compare per
element; then the *masked* tiles, where masks are rebuilt from int32 label and group ids and the
self column. The loops share one tile helper per kernel, specialised by the ``KIND`` constexpr
(0 clean, 1 positive, 2 masked).

Logits are never stored: each tile's ``s_ij`` comes from one ``tl.dot`` (fp32 accumulation) and
is kept in log2 units, ``x_ij * c_i`` with ``x_ij = <q_i, k_j> / |k_j|`` and the per-row scale
``c_i = log2(e) / (|q_i| tau)`` folded once per row, so each exponential is one ``exp2``.

Denominator codes: 0 = "all", 1 = "each_positive", 2 = "negatives". The temperature is read
from a one-element device tensor (it may be a learnable parameter: no host synchronisation).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

# Rows are normalised as x / sqrt(|x|² + 1e-24): unit vectors above a norm of ~1e-9, shrinking
# smoothly to 0 below (a zero row scales by 1e12); one formula and no branch, forward and backward.
NORM_FLOOR_SQUARED = tl.constexpr(1e-24)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# each_positive's positive pass multiplies factors in [1, 2] over this many tiles before one log2:
# at most 2^64, a finite float32.
PRODUCT_TILES = tl.constexpr(64)
DENOMINATOR_CODES = {"all": 0, "each_positive": 1, "negatives": 2}


# ----------------------------------------------------------------------------- rows in and out


@triton.jit
def _row_offsets(rows, HW, W, sB, sH, sW):
    # Row r is pixel (r // HW, (r % HW) // W, r % W); a 2-D input has HW = W = 1, sH = sW = 0.
    rows = rows.to(tl.int64)
    pixel = rows % HW
    return (rows // HW) * sB + (pixel // W) * sH + (pixel % W) * sW


@triton.jit
def _inverse_norm(x, axis: tl.constexpr):
    """1 / sqrt(|x|² + floor²) along ``axis``, the entries first divided by m = max(1, the largest
    |entry|) (then 1 / (m sqrt(|x/m|² + floor²))): a float32 sum of squares overflows from norms of
    ~1e19, which would give a zero row (or NaN) for finite input."""
    largest = tl.maximum(tl.max(tl.abs(x), axis=axis), 1.0)
    y = x / tl.expand_dims(largest, axis)
    return 1.0 / (tl.sqrt(tl.sum(y * y, axis=axis) + NORM_FLOOR_SQUARED) * largest)


@triton.jit
def _gather(x_ptr, perm_ptr, out_ptr, inv_norm_ptr, n, total, D, HW, W, sB, sD, sH, sW,
            NORMALIZE: tl.constexpr, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, D_PAD)
    inside = rows < n
    written = rows < total
    source = tl.load(perm_ptr + rows, mask=inside, other=0)
    offsets = _row_offsets(source, HW, W, sB, sH, sW)[:, None] + dims.to(tl.int64)[None, :] * sD
    x = tl.load(x_ptr + offsets, mask=inside[:, None] & (dims < D)[None, :], other=0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D_PAD + dims[None, :], x, mask=written[:, None])
    if NORMALIZE:
        inv = _inverse_norm(x.to(tl.float32), 1)
        inv = tl.where(inside, inv, 1.0)
    else:
        inv = tl.full([BLOCK], 1.0, tl.float32)
    tl.store(inv_norm_ptr + rows, inv, mask=written)
    return rows, source, inv


@triton.jit
def gather_rows_kernel(x_ptr, perm_ptr, out_ptr, inv_norm_ptr, n, total, D, HW, W, sB, sD, sH, sW,
                       NORMALIZE: tl.constexpr, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    """out[i] = x[perm[i]] zero-padded to D_PAD (rows n <= i < total zero),
    inv_norm[i] = 1 / sqrt(|x[perm[i]]|² + floor²) (1 without normalisation and on padding rows)."""
    _gather(x_ptr, perm_ptr, out_ptr, inv_norm_ptr, n, total, D, HW, W, sB, sD, sH, sW, NORMALIZE, BLOCK, D_PAD)


@triton.jit
def gather_partials_kernel(x_ptr, perm_ptr, out_ptr, inv_norm_ptr, n, total, D, HW, W, sB, sD, sH, sW,
                           grad_ptr, grad_stride, valid_ptr, n_pad, partials_ptr, partials,
                           NORMALIZE: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr,
                           D_PAD: tl.constexpr):
    """``gather_rows_kernel`` for the backward, which also writes per program, over its rows below
    n_pad, the largest inverse norm, the largest |g_i| (WITH_GRAD: the incoming gradient of the
    contributing rows, ``valid``; else 0) and the largest |g_i| times inverse norm: three rows of
    ``partials`` entries, from which ``_plan_kernels.backward_rows_kernel`` takes the backward
    kernels' prescales."""
    rows, source, inv = _gather(x_ptr, perm_ptr, out_ptr, inv_norm_ptr, n, total, D, HW, W, sB, sD, sH, sW,
                                NORMALIZE, BLOCK, D_PAD)
    padded = rows < n_pad
    if WITH_GRAD:
        contributing = (rows < n) & (tl.load(valid_ptr + rows, mask=padded, other=0) != 0)
        g = tl.load(grad_ptr + source.to(tl.int64) * grad_stride, mask=contributing, other=0.0)
        g = tl.abs(g.to(tl.float32))
    else:
        g = tl.zeros([BLOCK], tl.float32)
    pid = tl.program_id(0)
    tl.store(partials_ptr + pid, tl.max(tl.where(padded, inv, 0.0), axis=0))
    tl.store(partials_ptr + partials + pid, tl.max(g, axis=0))
    tl.store(partials_ptr + 2 * partials + pid, tl.max(g * inv, axis=0))


@triton.jit
def _store_grad(ptr, grad, x, inv, perm_ptr, rows, n, D, NORMALIZE: tl.constexpr, D_PAD: tl.constexpr):
    """Gradient w.r.t. the raw rows x from the gradient g w.r.t. u = x·inv (the normalised rows),
    inv·(g - u (u·g)), stored at the rows' original places (``perm``) of a contiguous (n, D) buffer."""
    if NORMALIZE:
        unit = x.to(tl.float32) * inv[:, None]
        grad = (grad - unit * tl.sum(unit * grad, axis=1)[:, None]) * inv[:, None]
    inside = rows < n
    target = tl.load(perm_ptr + rows, mask=inside, other=0).to(tl.int64)
    dims = tl.arange(0, D_PAD)
    tl.store(ptr + (target * D)[:, None] + dims[None, :], grad, mask=inside[:, None] & (dims < D)[None, :])


@triton.jit
def _tile(ptr, tile, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    """Rows tile*BLOCK .. +BLOCK of a gathered copy: unmasked, contiguous, 16-byte aligned."""
    base = ptr + tile.to(tl.int64) * (BLOCK * D_PAD)
    return tl.load(base + tl.arange(0, BLOCK)[:, None] * D_PAD + tl.arange(0, D_PAD)[None, :])


@triton.jit
def _reload_tile(ptr, tile, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    """The owned tile again for an epilogue. Holding the loop's operand in registers through the loop
    costs spills; a load that differs from _tile's (its cache hint) is not merged with it."""
    base = ptr + tile.to(tl.int64) * (BLOCK * D_PAD)
    return tl.load(base + tl.arange(0, BLOCK)[:, None] * D_PAD + tl.arange(0, D_PAD)[None, :], cache_modifier=".cg")


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation.

    UPCAST is set only under Triton's interpreter for bfloat16, whose tl.dot multiplies the raw
    uint16 storage of bfloat16 values; bf16 -> fp32 is exact, so the result is the same as the
    GPU's bf16 tensor-core product with fp32 accumulation.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _candidates(row_label, col_label, row_group, col_group, not_self, HAS_GROUPS: tl.constexpr,
                HAS_SELF: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Candidate pairs of a masked tile: valid column (and row) ids, groups that meet, not a row's own key.

    Rows and columns are queries and keys or keys and queries; every test is symmetric but the self
    one (``not_self``, built by the caller). Rows need checking only where a row is also a key."""
    candidate = (col_label >= 0)[None, :]
    if CHECK_ROWS:
        candidate &= (row_label >= 0)[:, None]
    if HAS_GROUPS:
        candidate &= ((row_group[:, None] == col_group[None, :]) | (row_group < 0)[:, None]
                      | (col_group < 0)[None, :])
    if HAS_SELF:
        candidate &= not_self
    return candidate


@triton.jit
def _log2(x, INTERPRETED: tl.constexpr):
    """log2 through the special-function unit (lg2.approx, absolute error ~2^-22 on [1, 2]); the
    interpreter has no libdevice."""
    if INTERPRETED:
        y = tl.log2(x)
    else:
        y = libdevice.fast_log2f(x)
    return y


@triton.jit
def _ids(label_ptr, group_ptr, idx, HAS_GROUPS: tl.constexpr):
    label = tl.load(label_ptr + idx)
    if HAS_GROUPS:
        group = tl.load(group_ptr + idx)
    else:
        group = label
    return label, group


@triton.jit
def _counts(counts_ptr, pid):
    """(first clean, first positive, first masked, end) of a program's tile list."""
    n_clean = tl.load(counts_ptr + 3 * pid)
    n_positive = tl.load(counts_ptr + 3 * pid + 1)
    n_masked = tl.load(counts_ptr + 3 * pid + 2)
    return 0, n_clean, n_clean + n_positive, n_clean + n_positive + n_masked


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tile(q, c, m, l, pos_sum, q_label, q_group, self_col, k_ptr, k_inv_ptr, k_label_ptr, k_group_ptr, kt,
              KIND: tl.constexpr, DENOM: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr,
              DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr):
    """One key tile of the online log-sum-exp (running max m of x, l = sum 2^(x c - m c)) and of the
    positive logits' sum. KIND 0 (clean): every pair in the denominator set, no positive; 1
    (positive): every pair a candidate, positives by label; 2 (masked): every mask."""
    cols = kt * BLOCK_M + tl.arange(0, BLOCK_M)
    k = _tile(k_ptr, kt, BLOCK_M, D_PAD)
    x = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * tl.load(k_inv_ptr + cols)[None, :]
    if KIND == 0 or (KIND == 1 and DENOM == 0):
        if KIND == 1:
            positive = q_label[:, None] == tl.load(k_label_ptr + cols)[None, :]
            pos_sum += tl.sum(tl.where(positive, x, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        mc = m_new * c
        l = l * tl.exp2(m * c - mc) + tl.sum(tl.exp2(x * c[:, None] - mc[:, None]), axis=1)
    else:
        k_label, k_group = _ids(k_label_ptr, k_group_ptr, cols, HAS_GROUPS)
        positive = q_label[:, None] == k_label[None, :]
        if KIND == 2:
            candidate = _candidates(q_label, k_label, q_group, k_group, self_col[:, None] != cols[None, :],
                                    HAS_GROUPS, HAS_SELF, False)
            positive &= candidate
            in_denominator = _denominator(candidate, positive, DENOM)
        else:
            in_denominator = ~positive
        if DENOM != 1:
            pos_sum += tl.sum(tl.where(positive, x, 0.0), axis=1)
        x = tl.where(in_denominator, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # A row with nothing in its set so far keeps m = -inf: shift by 0 then (no inf - inf);
        # c > 0, so -inf * c stays -inf and its exp2 is 0.
        mc = tl.where(m_new > float("-inf"), m_new * c, 0.0)
        l = l * tl.exp2(m * c - mc) + tl.sum(tl.exp2(x * c[:, None] - mc[:, None]), axis=1)
    return m_new, l, pos_sum


@triton.jit
def info_nce_fwd_kernel(
    q_ptr, k_ptr, q_inv_ptr, k_inv_ptr, q_label_ptr, k_label_ptr, q_group_ptr, k_group_ptr, self_col_ptr,
    order_ptr, counts_ptr, n_pos_ptr, valid_ptr, perm_ptr, n, loss_ptr, lse_ptr, tau_ptr, key_tiles,
    DENOM: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    """Per sorted query row: log2-sum-exp of its denominator set, and the loss at the row's place in the
    caller's order (``perm``; positive counts and the contributing flag come from the plan)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    q = _tile(q_ptr, pid, BLOCK_N, D_PAD)
    c = tl.load(q_inv_ptr + rows) * (LOG2E / tl.load(tau_ptr))  # x * c: the logit in log2 units
    q_label, q_group = _ids(q_label_ptr, q_group_ptr, rows, HAS_GROUPS)
    if HAS_SELF:
        self_col = tl.load(self_col_ptr + rows)
    else:
        self_col = q_label
    order = order_ptr + pid.to(tl.int64) * key_tiles
    first_clean, first_positive, first_masked, end = _counts(counts_ptr, pid)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_N], tl.float32)
    pos_sum = tl.zeros([BLOCK_N], tl.float32)  # sum of x over positives
    for t in range(first_clean, first_positive):
        m, l, pos_sum = _fwd_tile(q, c, m, l, pos_sum, q_label, q_group, self_col, k_ptr, k_inv_ptr, k_label_ptr,
                                  k_group_ptr, tl.load(order + t), 0, DENOM, HAS_GROUPS, HAS_SELF, DOT_PRECISION,
                                  UPCAST, BLOCK_M, D_PAD)
    for t in range(first_positive, first_masked):
        m, l, pos_sum = _fwd_tile(q, c, m, l, pos_sum, q_label, q_group, self_col, k_ptr, k_inv_ptr, k_label_ptr,
                                  k_group_ptr, tl.load(order + t), 1, DENOM, HAS_GROUPS, HAS_SELF, DOT_PRECISION,
                                  UPCAST, BLOCK_M, D_PAD)
    for t in range(first_masked, end):
        m, l, pos_sum = _fwd_tile(q, c, m, l, pos_sum, q_label, q_group, self_col, k_ptr, k_inv_ptr, k_label_ptr,
                                  k_group_ptr, tl.load(order + t), 2, DENOM, HAS_GROUPS, HAS_SELF, DOT_PRECISION,
                                  UPCAST, BLOCK_M, D_PAD)
    lse2 = tl.where(l > 0, m * c + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
    pos_count = tl.maximum(tl.load(n_pos_ptr + rows), 1).to(tl.float32)

    if DENOM == 1:
        row_loss = tl.zeros([BLOCK_N], tl.float32)  # info_nce_fwd_positive_kernel writes it
    else:
        row_loss = (lse2 - pos_sum * c / pos_count) * LN2
    valid = tl.load(valid_ptr + rows) != 0
    inside = rows < n
    tl.store(loss_ptr + tl.load(perm_ptr + rows, mask=inside, other=0), tl.where(valid, row_loss, 0.0), mask=inside)
    tl.store(lse_ptr + rows, lse2)


@triton.jit
def _positive_tile(q, c, lse2, product, softplus_acc, sigmoid_acc, row_label, self_col, k_ptr, k_inv_ptr,
                   k_label_ptr, start, end, ONE_LABEL: tl.constexpr, HAS_SELF: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr):
    """One key tile [start, start + BLOCK_M) of a range ending at ``end``, into element-wise accumulators
    of softplus(z) = max(z, 0) + log2(1 + t) and sigmoid(z) = (1 or t) / (1 + t), z = lse - s (log2
    units), t = 2^-|z|: ``softplus_acc`` takes max(z, 0), ``product`` multiplies the (1 + t), whose
    log2 the caller takes once every PRODUCT_TILES tiles. Non-positives get z = -inf: terms exactly 0
    and a factor of 1. ONE_LABEL: every key in range is a positive of every row (the chunk's
    ``exact`` flag), so no label compare."""
    columns = tl.arange(0, BLOCK_M)
    in_range = columns < end - start
    # Unmasked: keys past the range are other keys or the copy's tail (finite, _plan.POSITIVE_TAIL).
    k = tl.load(k_ptr + tl.cast(start, tl.int64) * D_PAD + columns[:, None] * D_PAD + tl.arange(0, D_PAD)[None, :])
    k_inv = tl.load(k_inv_ptr + start + columns)
    dot = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST)
    if ONE_LABEL:
        # A key out of range gets x = +inf, so z = -inf, in the same FMA.
        x = dot * k_inv[None, :] + tl.where(in_range, 0.0, float("inf"))[None, :]
        z = lse2[:, None] - x * c[:, None]
    else:
        x = dot * k_inv[None, :]
        positive = row_label[:, None] == tl.load(k_label_ptr + start + columns, mask=in_range, other=-3)[None, :]
        z = tl.where(positive, lse2[:, None] - x * c[:, None], float("-inf"))
    if HAS_SELF:
        z = tl.where(self_col[:, None] != (start + columns)[None, :], z, float("-inf"))
    t = tl.exp2(-tl.abs(z))
    v = 1.0 + t
    return (product * v, softplus_acc + tl.maximum(z, 0.0),
            sigmoid_acc + tl.fdiv(tl.where(z >= 0, 1.0, t), v, approx=True))


@triton.jit
def _positive_sweep(q, c, lse2, row_label, self_col, k_ptr, k_inv_ptr, k_label_ptr, ranges_ptr,
                    ONE_LABEL: tl.constexpr, HAS_SELF: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                    D_PAD: tl.constexpr):
    """(sum of softplus, sum of sigmoid) over each row's positives in the program's two key ranges
    (``ranges_ptr``: lo, hi, lo, hi), tile by tile from each range's start."""
    softplus_acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    sigmoid_acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for r in range(0, 2):
        lo, hi = tl.load(ranges_ptr + 2 * r), tl.load(ranges_ptr + 2 * r + 1)
        for first in range(lo, hi, PRODUCT_TILES * BLOCK_M):
            product = tl.full([BLOCK_N, BLOCK_M], 1.0, tl.float32)
            for start in range(first, tl.minimum(first + PRODUCT_TILES * BLOCK_M, hi), BLOCK_M):
                product, softplus_acc, sigmoid_acc = _positive_tile(
                    q, c, lse2, product, softplus_acc, sigmoid_acc, row_label, self_col, k_ptr, k_inv_ptr,
                    k_label_ptr, start, hi, ONE_LABEL, HAS_SELF, DOT_PRECISION, UPCAST, BLOCK_M, D_PAD)
            softplus_acc += _log2(product, INTERPRETED)
    return tl.sum(softplus_acc, axis=1), tl.sum(sigmoid_acc, axis=1)


@triton.jit
def _positive_chunk(table, q_ptr, k_ptr, q_inv_ptr, k_inv_ptr, q_label_ptr, k_label_ptr, self_col_ptr, n_pos_ptr,
                    valid_ptr, perm_ptr, loss_ptr, lse_ptr, pos_sigmoid_ptr, scale, HAS_SELF: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INTERPRETED: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr):
    """Loss (at the rows' places in the caller's order) and sigmoid sum of the rows of one chunk
    (``table``: one row of the chunk table, _plan_kernels.plan_chunks_kernel)."""
    row_start, row_end = tl.load(table), tl.load(table + 1)
    rows = row_start + tl.arange(0, BLOCK_N)
    inside = rows < row_end
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * D_PAD + tl.arange(0, D_PAD)[None, :], mask=inside[:, None],
                other=0.0)
    c = tl.load(q_inv_ptr + rows, mask=inside, other=1.0) * scale
    lse2 = tl.load(lse_ptr + rows, mask=inside, other=float("-inf"))  # rows past the chunk: z = -inf
    row_label = tl.load(q_label_ptr + rows, mask=inside, other=-2)
    if HAS_SELF:
        self_col = tl.load(self_col_ptr + rows, mask=inside, other=-1)
    else:
        self_col = row_label
    if tl.load(table + 6) != 0:
        softplus_sum, sigmoid_sum = _positive_sweep(
            q, c, lse2, row_label, self_col, k_ptr, k_inv_ptr, k_label_ptr, table + 2, True, HAS_SELF,
            DOT_PRECISION, UPCAST, INTERPRETED, BLOCK_N, BLOCK_M, D_PAD)
    else:
        softplus_sum, sigmoid_sum = _positive_sweep(
            q, c, lse2, row_label, self_col, k_ptr, k_inv_ptr, k_label_ptr, table + 2, False, HAS_SELF,
            DOT_PRECISION, UPCAST, INTERPRETED, BLOCK_N, BLOCK_M, D_PAD)
    pos_count = tl.maximum(tl.load(n_pos_ptr + rows, mask=inside, other=1), 1).to(tl.float32)
    valid = tl.load(valid_ptr + rows, mask=inside, other=0) != 0
    target = tl.load(perm_ptr + rows, mask=inside, other=0)
    tl.store(loss_ptr + target, tl.where(valid, softplus_sum * LN2 / pos_count, 0.0), mask=inside)
    tl.store(pos_sigmoid_ptr + rows, sigmoid_sum, mask=inside)


@triton.jit
def info_nce_fwd_positive_kernel(
    q_ptr, k_ptr, q_inv_ptr, k_inv_ptr, q_label_ptr, k_label_ptr, self_col_ptr, chunks_ptr, n_chunks_ptr, n_pos_ptr,
    valid_ptr, perm_ptr, loss_ptr, lse_ptr, pos_sigmoid_ptr, tau_ptr, HAS_SELF: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    """each_positive's loss, after the forward's log2-sum-exp of the negatives (lse): per sorted query
    row the sums over its positives of softplus(lse - s_ip) and sigmoid(lse - s_ip).

    A chunk is at most BLOCK_N rows of one group (_plan.chunk_starts); its program visits only the
    two key ranges that hold the chunk's positives, in tiles that start where the ranges start: a
    (group, label)'s rows and keys are contiguous after the sort, so a large class is covered
    without the grid's misalignment. The number of chunks lives on the device (no host
    synchronisation): the grid is a bound, and each program takes every grid-th chunk."""
    scale = LOG2E / tl.load(tau_ptr)
    for chunk in range(tl.program_id(0), tl.load(n_chunks_ptr), tl.num_programs(0)):
        _positive_chunk(chunks_ptr + 7 * chunk, q_ptr, k_ptr, q_inv_ptr, k_inv_ptr, q_label_ptr, k_label_ptr,
                        self_col_ptr, n_pos_ptr, valid_ptr, perm_ptr, loss_ptr, lse_ptr, pos_sigmoid_ptr, scale,
                        HAS_SELF, DOT_PRECISION, UPCAST, INTERPRETED, BLOCK_N, BLOCK_M, D_PAD)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _grad_terms(e, a, b, positive, in_denominator, DENOM: tl.constexpr, KIND: tl.constexpr):
    """dL/ds of a positive (KIND 1) or masked (KIND 2) tile up to a per-row factor, from
    e = 2^(x c - lse2) and the row weights a, b (broadcastable): a e on the denominator set minus
    b w on positives, w = 1, or sigmoid(lse - s) = 1 / (1 + e) for "each_positive". On a positive
    tile every pair is a candidate, so ``in_denominator`` is not read."""
    if DENOM == 1:
        w = tl.fdiv(b, 1.0 + e, approx=True)
    else:
        w = b
    if KIND == 1:
        if DENOM == 0:
            grad = e * a - tl.where(positive, w, 0.0)
        else:
            grad = tl.where(positive, -w, e * a)
    else:
        grad = tl.where(in_denominator, e * a, 0.0) - tl.where(positive, w, 0.0)
    return grad


@triton.jit
def _denominator(candidate, positive, DENOM: tl.constexpr):
    if DENOM == 0:
        in_denominator = candidate
    else:
        in_denominator = candidate & ~positive
    return in_denominator


@triton.jit
def _dq_tile(q, c, shift, lse2, a, b, q_label, q_group, self_col, k_ptr, k_inv_ptr, k_label_ptr, k_group_ptr,
             col_scale, kt, KIND: tl.constexpr, DENOM: tl.constexpr, HAS_GROUPS: tl.constexpr,
             HAS_SELF: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
             D_PAD: tl.constexpr):
    """One key tile's share of dq: (dL/ds / g) times the keys, up to the prescale."""
    cols = kt * BLOCK_M + tl.arange(0, BLOCK_M)
    k = _tile(k_ptr, kt, BLOCK_M, D_PAD)
    k_inv = tl.load(k_inv_ptr + cols)
    x = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * k_inv[None, :]
    if KIND == 0:
        # a_i 2^(x c - lse2) with a_i folded into the exponent's shift.
        grad = tl.exp2(x * c[:, None] - shift[:, None])
    else:
        k_label, k_group = _ids(k_label_ptr, k_group_ptr, cols, HAS_GROUPS)
        positive = q_label[:, None] == k_label[None, :]
        e = tl.exp2(x * c[:, None] - lse2[:, None])
        if KIND == 1:
            grad = _grad_terms(e, a[:, None], b[:, None], positive, positive, DENOM, 1)
        else:
            candidate = _candidates(q_label, k_label, q_group, k_group, self_col[:, None] != cols[None, :],
                                    HAS_GROUPS, HAS_SELF, False)
            positive &= candidate
            grad = _grad_terms(e, a[:, None], b[:, None], positive, _denominator(candidate, positive, DENOM),
                               DENOM, 2)
    grad = grad * (k_inv * col_scale)[None, :]
    return _dot(grad.to(k.dtype), k, DOT_PRECISION, UPCAST)


@triton.jit
def info_nce_bwd_query_kernel(
    q_ptr, k_ptr, q_inv_ptr, k_inv_ptr, q_label_ptr, k_label_ptr, q_group_ptr, k_group_ptr, self_col_ptr,
    order_ptr, counts_ptr, lse_ptr, a_ptr, b_ptr, row_scale_ptr, col_scale_ptr, tau_ptr, key_tiles,
    perm_ptr, dq_ptr, tau_rows_ptr, n, D,
    DENOM: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TAU_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    """dq for one tile of sorted queries: sum over key tiles of dL/ds (recomputed) times the keys.

    The row's incoming gradient g_i is factored out of the tile products (``row_scale`` applies it
    after them), so the low-precision operand holds a_i p_ij - b_i w_ij (at most 1 in size) times
    the key's inverse norm and a power-of-two prescale (``col_scale``): it cannot flush to zero in
    fp16 however small g_i is.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    q = _tile(q_ptr, pid, BLOCK_N, D_PAD)
    q_inv = tl.load(q_inv_ptr + rows)
    tau = tl.load(tau_ptr)
    c = q_inv * (LOG2E / tau)
    q_label, q_group = _ids(q_label_ptr, q_group_ptr, rows, HAS_GROUPS)
    if HAS_SELF:
        self_col = tl.load(self_col_ptr + rows)
    else:
        self_col = q_label
    lse2 = tl.load(lse_ptr + rows)  # +inf on rows that do not contribute
    a = tl.load(a_ptr + rows)
    b = tl.load(b_ptr + rows)
    shift = tl.where(a > 0, lse2 - tl.log2(tl.maximum(a, 1e-38)), float("inf"))
    col_scale = tl.load(col_scale_ptr)
    order = order_ptr + pid.to(tl.int64) * key_tiles
    first_clean, first_positive, first_masked, end = _counts(counts_ptr, pid)

    acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for t in range(first_clean, first_positive):
        acc += _dq_tile(q, c, shift, lse2, a, b, q_label, q_group, self_col, k_ptr, k_inv_ptr, k_label_ptr,
                        k_group_ptr, col_scale, tl.load(order + t), 0, DENOM, HAS_GROUPS, HAS_SELF, DOT_PRECISION,
                        UPCAST, BLOCK_M, D_PAD)
    for t in range(first_positive, first_masked):
        acc += _dq_tile(q, c, shift, lse2, a, b, q_label, q_group, self_col, k_ptr, k_inv_ptr, k_label_ptr,
                        k_group_ptr, col_scale, tl.load(order + t), 1, DENOM, HAS_GROUPS, HAS_SELF, DOT_PRECISION,
                        UPCAST, BLOCK_M, D_PAD)
    for t in range(first_masked, end):
        acc += _dq_tile(q, c, shift, lse2, a, b, q_label, q_group, self_col, k_ptr, k_inv_ptr, k_label_ptr,
                        k_group_ptr, col_scale, tl.load(order + t), 2, DENOM, HAS_GROUPS, HAS_SELF, DOT_PRECISION,
                        UPCAST, BLOCK_M, D_PAD)

    # acc_i = sum_j dL/ds_ij * khat_j * col_scale / g_i: back to dL/dqhat_i = sum_j dL/ds_ij khat_j / tau.
    acc = acc * (tl.load(row_scale_ptr + rows) / (col_scale * tau))[:, None]
    q = _reload_tile(q_ptr, pid, BLOCK_N, D_PAD)
    if TAU_GRAD:
        # sum_j dL/ds_ij s_ij = <qhat_i, dL/dqhat_i> (see info_nce.py).
        tl.store(tau_rows_ptr + rows, q_inv * tl.sum(q.to(tl.float32) * acc, axis=1))
    _store_grad(dq_ptr, acc, q, q_inv, perm_ptr, rows, n, D, NORMALIZE, D_PAD)


@triton.jit
def _dk_tile(k, k_inv, k_label, k_group, cols, q_ptr, q_scale_ptr, q_label_ptr, q_group_ptr, self_col_ptr,
             lse_ptr, a_ptr, b_ptr, qt, KIND: tl.constexpr, DENOM: tl.constexpr, HAS_GROUPS: tl.constexpr,
             HAS_SELF: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
             D_PAD: tl.constexpr):
    """One query tile's share of dk, computed as a (keys, queries) tile: dL/ds times the queries."""
    rows = qt * BLOCK_N + tl.arange(0, BLOCK_N)
    q = _tile(q_ptr, qt, BLOCK_N, D_PAD)
    c = tl.load(q_scale_ptr + rows)
    lse2 = tl.load(lse_ptr + rows)
    a = tl.load(a_ptr + rows)
    x = _dot(k, tl.trans(q), DOT_PRECISION, UPCAST) * c[None, :]  # log2 units times |k_j|
    e = tl.exp2(x * k_inv[:, None] - lse2[None, :])
    if KIND == 0:
        grad = e * a[None, :]
    else:
        b = tl.load(b_ptr + rows)
        q_label, q_group = _ids(q_label_ptr, q_group_ptr, rows, HAS_GROUPS)
        positive = k_label[:, None] == q_label[None, :]
        if KIND == 1:
            grad = _grad_terms(e, a[None, :], b[None, :], positive, positive, DENOM, 1)
        else:
            if HAS_SELF:
                not_self = cols[:, None] != tl.load(self_col_ptr + rows)[None, :]
            else:
                not_self = positive
            # Rows are keys here: an ignored key's row must stay 0.
            candidate = _candidates(k_label, q_label, k_group, q_group, not_self, HAS_GROUPS, HAS_SELF, True)
            positive &= candidate
            grad = _grad_terms(e, a[None, :], b[None, :], positive, _denominator(candidate, positive, DENOM),
                               DENOM, 2)
    return _dot(grad.to(q.dtype), q, DOT_PRECISION, UPCAST)


@triton.jit
def info_nce_bwd_key_kernel(
    q_ptr, k_ptr, q_scale_ptr, k_inv_ptr, q_label_ptr, k_label_ptr, q_group_ptr, k_group_ptr, self_col_ptr,
    order_ptr, counts_ptr, lse_ptr, a_ptr, b_ptr, scale_ptr, tau_ptr, query_tiles,
    perm_ptr, dk_ptr, tau_rows_ptr, m, D,
    DENOM: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TAU_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    """dk for one tile of sorted keys: sum over query tiles of dL/ds (recomputed) times the queries.

    The per-query weights a_i, b_i carry g_i, the query's inverse norm and a power-of-two prescale
    (``scale``) that keeps the low-precision operand away from fp16's underflow; the epilogue
    divides it out. ``q_scale`` is the queries' c_i = log2(e) / (|q_i| tau).
    """
    pid = tl.program_id(0)
    cols = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    k = _tile(k_ptr, pid, BLOCK_M, D_PAD)
    k_inv = tl.load(k_inv_ptr + cols)
    k_label, k_group = _ids(k_label_ptr, k_group_ptr, cols, HAS_GROUPS)
    order = order_ptr + pid.to(tl.int64) * query_tiles
    first_clean, first_positive, first_masked, end = _counts(counts_ptr, pid)

    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for t in range(first_clean, first_positive):
        acc += _dk_tile(k, k_inv, k_label, k_group, cols, q_ptr, q_scale_ptr, q_label_ptr, q_group_ptr,
                        self_col_ptr, lse_ptr, a_ptr, b_ptr, tl.load(order + t), 0, DENOM, HAS_GROUPS, HAS_SELF,
                        DOT_PRECISION, UPCAST, BLOCK_N, D_PAD)
    for t in range(first_positive, first_masked):
        acc += _dk_tile(k, k_inv, k_label, k_group, cols, q_ptr, q_scale_ptr, q_label_ptr, q_group_ptr,
                        self_col_ptr, lse_ptr, a_ptr, b_ptr, tl.load(order + t), 1, DENOM, HAS_GROUPS, HAS_SELF,
                        DOT_PRECISION, UPCAST, BLOCK_N, D_PAD)
    for t in range(first_masked, end):
        acc += _dk_tile(k, k_inv, k_label, k_group, cols, q_ptr, q_scale_ptr, q_label_ptr, q_group_ptr,
                        self_col_ptr, lse_ptr, a_ptr, b_ptr, tl.load(order + t), 2, DENOM, HAS_GROUPS, HAS_SELF,
                        DOT_PRECISION, UPCAST, BLOCK_N, D_PAD)

    # acc_j = sum_i dL/ds_ij * qhat_i * scale: back to dL/dkhat_j = sum_i dL/ds_ij qhat_i / tau.
    tau = tl.load(tau_ptr)
    acc = acc / (tl.load(scale_ptr) * tau)
    k = _reload_tile(k_ptr, pid, BLOCK_M, D_PAD)
    if TAU_GRAD:
        tl.store(tau_rows_ptr + cols, k_inv * tl.sum(k.to(tl.float32) * acc, axis=1))
    _store_grad(dk_ptr, acc, k, k_inv, perm_ptr, cols, m, D, NORMALIZE, D_PAD)


@triton.jit
def _sym_tile(xr, c, rows, r_alpha, r_max, x_ptr, inv_ptr, label_ptr, group_ptr, lse_ptr, a_ptr, b_ptr, beta_ptr,
              col_max_ptr, ct, KIND: tl.constexpr, DENOM: tl.constexpr, HAS_GROUPS: tl.constexpr,
              DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    """One column tile's share of the self-contrast gradient of the row tile: (dL/ds_rj + dL/ds_jr)
    times the columns' unit rows, up to the prescale. The rows' ids and weights are loaded here, by
    the loops that need them (cached loads), to keep the clean loop's registers free."""
    cols = ct * BLOCK + tl.arange(0, BLOCK)
    xc = _tile(x_ptr, ct, BLOCK, D_PAD)
    c_inv = tl.load(inv_ptr + cols)
    s2 = _dot(xr, tl.trans(xc), DOT_PRECISION, UPCAST) * c_inv[None, :] * c[:, None]  # logits, log2 units
    if KIND == 2 or (KIND == 1 and DENOM == 1):
        # One exponential per direction: exact for any spread of the rows' log-sum-exps.
        r_label, r_group = _ids(label_ptr, group_ptr, rows, HAS_GROUPS)
        r_lse2 = tl.load(lse_ptr + rows)
        r_a = tl.load(a_ptr + rows)
        r_b = tl.load(b_ptr + rows)
        c_label, c_group = _ids(label_ptr, group_ptr, cols, HAS_GROUPS)
        c_lse2 = tl.load(lse_ptr + cols)
        c_a = tl.load(a_ptr + cols)
        c_b = tl.load(b_ptr + cols)
        positive = r_label[:, None] == c_label[None, :]
        if KIND == 1:
            in_denominator = ~positive
        else:
            candidate = _candidates(r_label, c_label, r_group, c_group, rows[:, None] != cols[None, :],
                                    HAS_GROUPS, True, True)
            positive &= candidate
            in_denominator = _denominator(candidate, positive, DENOM)
        # The two directions one after the other (fewer live tiles): row r's, then column j's.
        e = tl.exp2(s2 - r_lse2[:, None])
        grad = _grad_terms(e, r_a[:, None], r_b[:, None], positive, in_denominator, DENOM, 2)
        e = tl.exp2(s2 - c_lse2[None, :])
        grad += _grad_terms(e, c_a[None, :], c_b[None, :], positive, in_denominator, DENOM, 2)
        grad = grad * c_inv[None, :]
    else:
        # a_r 2^(s - L_r) + a_j 2^(s - L_j) = 2^(s - K) (alpha_r + beta_j), K = the column tile's largest
        # L, alpha_r = a_r 2^(K - L_r), beta_j = a_j 2^(K - L_j) (times the column's inverse norm).
        k_max = tl.load(col_max_ptr + ct)
        alpha = r_alpha * tl.exp2(k_max - r_max)
        grad = tl.exp2(s2 - k_max) * (alpha[:, None] * c_inv[None, :] + tl.load(beta_ptr + cols)[None, :])
        if KIND == 1:  # "all" or "negatives": the positives' constant weights
            positive = tl.load(label_ptr + rows)[:, None] == tl.load(label_ptr + cols)[None, :]
            w = (tl.load(b_ptr + rows)[:, None] + tl.load(b_ptr + cols)[None, :]) * c_inv[None, :]
            if DENOM == 0:
                grad -= tl.where(positive, w, 0.0)
            else:
                grad = tl.where(positive, -w, grad)
    return _dot(grad.to(xc.dtype), xc, DOT_PRECISION, UPCAST)


@triton.jit
def info_nce_bwd_symmetric_kernel(
    x_ptr, inv_ptr, label_ptr, group_ptr, order_ptr, counts_ptr, lse_ptr, a_ptr, b_ptr, alpha_ptr, beta_ptr,
    row_max_ptr, col_max_ptr, scale_ptr, tau_ptr, tiles, perm_ptr, dx_ptr, tau_rows_ptr, n, D,
    DENOM: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GROUPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TAU_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    """Self-contrast backward in one kernel: dx_r = sum_j (dL/ds_rj + dL/ds_jr) xhat_j / tau.

    s is symmetric, so one logit tile serves both terms: 2 products per logit instead of the 4 of
    separate dq and dk kernels, and every gradient row is written once (no atomics). Clean tiles (and
    positive ones for "all" and "negatives") take one exponential for both terms, which the host
    allows only where the rows' log2-sum-exps lie within _plan.SYMMETRIC_SPREAD of the column tile's
    largest (see docs/kernels.md); the others take one per term. a and b carry g and the prescale;
    row_max and col_max are the largest log2-sum-exp of each tile of BLOCK_N and of BLOCK_M rows.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    xr = _tile(x_ptr, pid, BLOCK_N, D_PAD)
    r_inv = tl.load(inv_ptr + rows)
    tau = tl.load(tau_ptr)
    c = r_inv * (LOG2E / tau)
    r_alpha = tl.load(alpha_ptr + rows)  # a_r 2^(max of its tile - L_r)
    r_max = tl.load(row_max_ptr + pid)
    order = order_ptr + pid.to(tl.int64) * tiles
    first_clean, first_positive, first_masked, end = _counts(counts_ptr, pid)

    acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for t in range(first_clean, first_positive):
        acc += _sym_tile(xr, c, rows, r_alpha, r_max, x_ptr, inv_ptr, label_ptr, group_ptr, lse_ptr, a_ptr, b_ptr,
                         beta_ptr, col_max_ptr, tl.load(order + t), 0, DENOM,
                         HAS_GROUPS, DOT_PRECISION, UPCAST, BLOCK_M, D_PAD)
    for t in range(first_positive, first_masked):
        acc += _sym_tile(xr, c, rows, r_alpha, r_max, x_ptr, inv_ptr, label_ptr, group_ptr, lse_ptr, a_ptr, b_ptr,
                         beta_ptr, col_max_ptr, tl.load(order + t), 1, DENOM,
                         HAS_GROUPS, DOT_PRECISION, UPCAST, BLOCK_M, D_PAD)
    for t in range(first_masked, end):
        acc += _sym_tile(xr, c, rows, r_alpha, r_max, x_ptr, inv_ptr, label_ptr, group_ptr, lse_ptr, a_ptr, b_ptr,
                         beta_ptr, col_max_ptr, tl.load(order + t), 2, DENOM,
                         HAS_GROUPS, DOT_PRECISION, UPCAST, BLOCK_M, D_PAD)

    acc = acc / (tl.load(scale_ptr) * tau)
    xr = _reload_tile(x_ptr, pid, BLOCK_N, D_PAD)
    if TAU_GRAD:
        # sum_j (dL/ds_rj + dL/ds_jr) s_rj; summed over r it counts every pair twice.
        tl.store(tau_rows_ptr + rows, r_inv * tl.sum(xr.to(tl.float32) * acc, axis=1))
    _store_grad(dx_ptr, acc, xr, r_inv, perm_ptr, rows, n, D, NORMALIZE, D_PAD)
