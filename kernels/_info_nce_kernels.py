"""Triton kernels of the fused masked InfoNCE.

Logits are never stored: every kernel recomputes its (BLOCK_N, BLOCK_M) tile of
``s_ij = <q_i, k_j> * qscale_i * kscale_j`` with one ``tl.dot`` (fp32 accumulation) and rebuilds
the positive / negative masks from the labels, groups and the self offset. Rows are whole in
registers, padded to ``D_PAD`` (a power of two >= 16) and masked, so inputs are never copied.

Denominator codes: 0 = "all", 1 = "each_positive", 2 = "negatives". The temperature is read
from a one-element tensor (it may be a learnable parameter: no host synchronisation), and
group id ``SHARED`` (-1) on either side of a pair matches every group.
"""

from __future__ import annotations

import triton
import triton.language as tl

# F.normalize divides by max(|x|, eps).
NORM_EPS = tl.constexpr(1e-12)
SHARED = tl.constexpr(-1)  # contrastkit._options.SHARED
GROUP_MIN = tl.constexpr(-9223372036854775807)
GROUP_MAX = tl.constexpr(9223372036854775807)
DENOMINATOR_CODES = {"all": 0, "each_positive": 1, "negatives": 2}


@triton.jit
def _row_offsets(rows, HW, W, sB, sH, sW):
    # Row r is pixel (r // HW, (r % HW) // W, r % W); a 2-D input has HW = W = 1, sH = sW = 0.
    rows = rows.to(tl.int64)
    pixel = rows % HW
    return (rows // HW) * sB + (pixel // W) * sH + (pixel % W) * sW


@triton.jit
def _load_rows(ptr, rows, n, D, HW, W, sB, sD, sH, sW, D_PAD: tl.constexpr):
    dims = tl.arange(0, D_PAD)
    offsets = _row_offsets(rows, HW, W, sB, sH, sW)[:, None] + dims.to(tl.int64)[None, :] * sD
    return tl.load(ptr + offsets, mask=(rows < n)[:, None] & (dims < D)[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, value, rows, n, D, HW, W, sB, sD, sH, sW, D_PAD: tl.constexpr):
    dims = tl.arange(0, D_PAD)
    offsets = _row_offsets(rows, HW, W, sB, sH, sW)[:, None] + dims.to(tl.int64)[None, :] * sD
    tl.store(ptr + offsets, value, mask=(rows < n)[:, None] & (dims < D)[None, :])


@triton.jit
def row_norm_kernel(x_ptr, norm_ptr, n, D, HW, W, sB, sD, sH, sW,
                    BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = _load_rows(x_ptr, rows, n, D, HW, W, sB, sD, sH, sW, D_PAD).to(tl.float32)
    tl.store(norm_ptr + rows, tl.sqrt(tl.sum(x * x, axis=1)), mask=rows < n)


@triton.jit
def _row_scale(norm_ptr, rows, n, factor, NORMALIZE: tl.constexpr):
    """factor / max(|x|, eps) per row (just factor without normalisation)."""
    if NORMALIZE:
        norm = tl.load(norm_ptr + rows, mask=rows < n, other=1.0)
        return factor / tl.maximum(norm, NORM_EPS)
    else:
        return tl.zeros_like(rows).to(tl.float32) + factor


@triton.jit
def _load_ids(label_ptr, group_ptr, idx, count, ignore_index, HAS_GROUPS: tl.constexpr):
    inside = idx < count
    # Padding rows/columns read as ignore_index, so they are never positive or candidate.
    label = tl.load(label_ptr + idx, mask=inside, other=ignore_index)
    if HAS_GROUPS:
        group = tl.load(group_ptr + idx, mask=inside, other=0)
    else:
        group = label
    return label, group


@triton.jit
def _group_range(group, idx, count):
    """Smallest and largest group id among the valid entries of a tile; every group when the
    tile holds a SHARED entry."""
    inside = idx < count
    shared = tl.max((inside & (group == SHARED)).to(tl.int32), axis=0) > 0
    lo = tl.min(tl.where(inside, group, GROUP_MAX), axis=0)
    hi = tl.max(tl.where(inside, group, GROUP_MIN), axis=0)
    return tl.where(shared, GROUP_MIN, lo), tl.where(shared, GROUP_MAX, hi)


@triton.jit
def _tiles_meet(tile_lo_ptr, tile_hi_ptr, tile, lo, hi, HAS_GROUPS: tl.constexpr):
    """Whether other-side tile `tile` may hold a pair with the group range [lo, hi].

    Only pairs within one group are candidates, so a tile whose group range misses [lo, hi]
    contributes nothing and is skipped. Conservative for any order; with rows sorted by group
    (one image after another) only the tiles near the block diagonal are computed.
    """
    if HAS_GROUPS:
        return (tl.load(tile_lo_ptr + tile) <= hi) & (tl.load(tile_hi_ptr + tile) >= lo)
    else:
        return True


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
def _pair_masks(rows, cols, q_label, k_label, q_group, k_group, self_offset, ignore_index,
                HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr):
    candidate = (q_label != ignore_index)[:, None] & (k_label != ignore_index)[None, :]
    if HAS_GROUPS:
        candidate = candidate & ((q_group[:, None] == k_group[None, :]) | (q_group == SHARED)[:, None]
                                 | (k_group == SHARED)[None, :])
    if HAS_SELF:
        candidate = candidate & ((rows + self_offset)[:, None] != cols[None, :])
    positive = candidate & (q_label[:, None] == k_label[None, :])
    negative = candidate & (q_label[:, None] != k_label[None, :])
    return positive, negative


@triton.jit
def _key_tile(k_ptr, k_norm_ptr, k_label_ptr, k_group_ptr, start, m, D, k_HW, k_W, k_sB, k_sD, k_sH, k_sW,
              q, q_scale, rows, q_label, q_group, self_offset, ignore_index,
              NORMALIZE: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr,
              DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr):
    """Keys start..start+BLOCK_M against a query tile: the keys, their scales, the logits and the masks."""
    cols = start + tl.arange(0, BLOCK_M)
    k = _load_rows(k_ptr, cols, m, D, k_HW, k_W, k_sB, k_sD, k_sH, k_sW, D_PAD)
    k_scale = _row_scale(k_norm_ptr, cols, m, 1.0, NORMALIZE)
    k_label, k_group = _load_ids(k_label_ptr, k_group_ptr, cols, m, ignore_index, HAS_GROUPS)
    s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * q_scale[:, None] * k_scale[None, :]
    positive, negative = _pair_masks(rows, cols, q_label, k_label, q_group, k_group,
                                     self_offset, ignore_index, HAS_GROUPS, HAS_SELF)
    return k, k_scale, s, positive, negative


@triton.jit
def _query_tile(q_ptr, q_norm_ptr, q_label_ptr, q_group_ptr, lse_ptr, exp_weight_ptr, pos_weight_ptr, rows, n, D,
                q_HW, q_W, q_sB, q_sD, q_sH, q_sW, inv_tau, ignore_index,
                NORMALIZE: tl.constexpr, HAS_GROUPS: tl.constexpr, D_PAD: tl.constexpr):
    """A query tile as the backward needs it: rows, scales, ids and the forward's per-row statistics."""
    q = _load_rows(q_ptr, rows, n, D, q_HW, q_W, q_sB, q_sD, q_sH, q_sW, D_PAD)
    q_scale = _row_scale(q_norm_ptr, rows, n, inv_tau, NORMALIZE)
    q_label, q_group = _load_ids(q_label_ptr, q_group_ptr, rows, n, ignore_index, HAS_GROUPS)
    lse = tl.load(lse_ptr + rows, mask=rows < n, other=float("inf"))
    exp_weight = tl.load(exp_weight_ptr + rows, mask=rows < n, other=0.0)
    pos_weight = tl.load(pos_weight_ptr + rows, mask=rows < n, other=0.0)
    return q, q_scale, q_label, q_group, lse, exp_weight, pos_weight


@triton.jit
def _grad_logits(s, positive, negative, lse, exp_weight, pos_weight, DENOM: tl.constexpr):
    """d loss_i / d s_ij, given the row's log-sum-exp and two per-row weights (see info_nce.py)."""
    if DENOM == 0:
        in_denominator = positive | negative
    else:
        in_denominator = negative
    grad = tl.where(in_denominator, tl.exp(s - lse[:, None]), 0.0) * exp_weight[:, None]
    if DENOM == 1:
        grad -= tl.where(positive, tl.sigmoid(lse[:, None] - s), 0.0) * pos_weight[:, None]
    else:
        grad -= tl.where(positive, pos_weight[:, None], 0.0)
    return grad


@triton.jit
def _normalize_grad(grad, x, norm, NORMALIZE: tl.constexpr):
    """Gradient w.r.t. raw rows x from the gradient w.r.t. x / max(|x|, eps) (F.normalize)."""
    if NORMALIZE:
        inv = 1.0 / tl.maximum(norm, NORM_EPS)
        unit = x.to(tl.float32) * inv[:, None]
        projected = grad - unit * tl.sum(unit * grad, axis=1)[:, None]
        grad = tl.where((norm > NORM_EPS)[:, None], projected, grad) * inv[:, None]
    return grad


@triton.jit
def info_nce_fwd_kernel(
    q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, q_label_ptr, k_label_ptr, q_group_ptr, k_group_ptr,
    tile_lo_ptr, tile_hi_ptr, loss_ptr, valid_ptr, lse_ptr, n_pos_ptr, pos_sigmoid_ptr,
    n, m, D, self_offset, ignore_index, tau_ptr,
    q_HW, q_W, q_sB, q_sD, q_sH, q_sW,
    k_HW, k_W, k_sB, k_sD, k_sH, k_sW,
    DENOM: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    q = _load_rows(q_ptr, rows, n, D, q_HW, q_W, q_sB, q_sD, q_sH, q_sW, D_PAD)
    q_scale = _row_scale(q_norm_ptr, rows, n, 1.0 / tl.load(tau_ptr), NORMALIZE)
    q_label, q_group = _load_ids(q_label_ptr, q_group_ptr, rows, n, ignore_index, HAS_GROUPS)
    group_lo, group_hi = _group_range(q_group, rows, n)

    # Online log-sum-exp over the denominator set: running max and sum of exp(s - max).
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    pos_logit_sum = tl.zeros([BLOCK_N], tl.float32)
    n_pos = tl.zeros([BLOCK_N], tl.int32)
    n_neg = tl.zeros([BLOCK_N], tl.int32)
    for start in range(0, m, BLOCK_M):
        if _tiles_meet(tile_lo_ptr, tile_hi_ptr, start // BLOCK_M, group_lo, group_hi, HAS_GROUPS):
            _, _, s, positive, negative = _key_tile(
                k_ptr, k_norm_ptr, k_label_ptr, k_group_ptr, start, m, D, k_HW, k_W, k_sB, k_sD, k_sH, k_sW,
                q, q_scale, rows, q_label, q_group, self_offset, ignore_index,
                NORMALIZE, HAS_GROUPS, HAS_SELF, DOT_PRECISION, UPCAST, BLOCK_M, D_PAD)
            if DENOM == 0:
                in_denominator = positive | negative
            else:
                in_denominator = negative
            new_max = tl.maximum(run_max, tl.max(tl.where(in_denominator, s, float("-inf")), axis=1))
            # A row with nothing in its set so far keeps max -inf; shift by 0 then to avoid inf - inf.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(
                tl.where(in_denominator, tl.exp(s - shift[:, None]), 0.0), axis=1)
            run_max = new_max
            pos_logit_sum += tl.sum(tl.where(positive, s, 0.0), axis=1)
            n_pos += tl.sum(positive.to(tl.int32), axis=1)
            n_neg += tl.sum(negative.to(tl.int32), axis=1)
    lse = tl.where(run_sum > 0, run_max + tl.log(tl.where(run_sum > 0, run_sum, 1.0)), float("-inf"))
    pos_count = tl.maximum(n_pos, 1).to(tl.float32)

    if DENOM == 1:
        # each_positive: softplus(lse_neg - s_ip) summed over positives needs the final lse_neg,
        # hence a second sweep. It also yields sum_p sigmoid(lse_neg - s_ip) for the backward.
        softplus_sum = tl.zeros([BLOCK_N], tl.float32)
        sigmoid_sum = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, m, BLOCK_M):
            if _tiles_meet(tile_lo_ptr, tile_hi_ptr, start // BLOCK_M, group_lo, group_hi, HAS_GROUPS):
                _, _, s, positive, negative = _key_tile(
                    k_ptr, k_norm_ptr, k_label_ptr, k_group_ptr, start, m, D, k_HW, k_W, k_sB, k_sD, k_sH, k_sW,
                    q, q_scale, rows, q_label, q_group, self_offset, ignore_index,
                    NORMALIZE, HAS_GROUPS, HAS_SELF, DOT_PRECISION, UPCAST, BLOCK_M, D_PAD)
                x = lse[:, None] - s
                softplus = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
                softplus_sum += tl.sum(tl.where(positive, softplus, 0.0), axis=1)
                sigmoid_sum += tl.sum(tl.where(positive, tl.sigmoid(x), 0.0), axis=1)
        row_loss = softplus_sum / pos_count
        tl.store(pos_sigmoid_ptr + rows, sigmoid_sum, mask=rows < n)
    else:
        row_loss = lse - pos_logit_sum / pos_count

    valid = (q_label != ignore_index) & (n_pos > 0)
    if DENOM == 2:
        valid = valid & (n_neg > 0)
    inside = rows < n
    tl.store(loss_ptr + rows, tl.where(valid, row_loss, 0.0), mask=inside)
    tl.store(valid_ptr + rows, valid.to(tl.int8), mask=inside)
    tl.store(lse_ptr + rows, lse, mask=inside)
    tl.store(n_pos_ptr + rows, n_pos, mask=inside)


@triton.jit
def info_nce_bwd_query_kernel(
    q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, q_label_ptr, k_label_ptr, q_group_ptr, k_group_ptr,
    tile_lo_ptr, tile_hi_ptr, lse_ptr, exp_weight_ptr, pos_weight_ptr, dq_ptr, tau_rows_ptr,
    n, m, D, self_offset, ignore_index, tau_ptr,
    q_HW, q_W, q_sB, q_sD, q_sH, q_sW,
    k_HW, k_W, k_sB, k_sD, k_sH, k_sW,
    dq_sB, dq_sD, dq_sH, dq_sW,
    DENOM: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TAU_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    """dq for one query tile: sum over key tiles of dL/ds (recomputed) times the keys."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    inv_tau = 1.0 / tl.load(tau_ptr)
    q, q_scale, q_label, q_group, lse, exp_weight, pos_weight = _query_tile(
        q_ptr, q_norm_ptr, q_label_ptr, q_group_ptr, lse_ptr, exp_weight_ptr, pos_weight_ptr, rows, n, D,
        q_HW, q_W, q_sB, q_sD, q_sH, q_sW, inv_tau, ignore_index, NORMALIZE, HAS_GROUPS, D_PAD)
    group_lo, group_hi = _group_range(q_group, rows, n)

    acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for start in range(0, m, BLOCK_M):
        if _tiles_meet(tile_lo_ptr, tile_hi_ptr, start // BLOCK_M, group_lo, group_hi, HAS_GROUPS):
            k, k_scale, s, positive, negative = _key_tile(
                k_ptr, k_norm_ptr, k_label_ptr, k_group_ptr, start, m, D, k_HW, k_W, k_sB, k_sD, k_sH, k_sW,
                q, q_scale, rows, q_label, q_group, self_offset, ignore_index,
                NORMALIZE, HAS_GROUPS, HAS_SELF, DOT_PRECISION, UPCAST, BLOCK_M, D_PAD)
            grad_s = _grad_logits(s, positive, negative, lse, exp_weight, pos_weight, DENOM)
            grad_s = grad_s * k_scale[None, :]
            acc += _dot(grad_s.to(k.dtype), k, DOT_PRECISION, UPCAST)
    if TAU_GRAD:
        # acc_i = sum_j dL/ds_ij k_hat_j, so sum_j dL/ds_ij s_ij = q_scale_i <q_i, acc_i> (see info_nce.py).
        tl.store(tau_rows_ptr + rows, q_scale * tl.sum(q.to(tl.float32) * acc, axis=1), mask=rows < n)
    acc = acc * inv_tau
    if NORMALIZE:
        q_norm = tl.load(q_norm_ptr + rows, mask=rows < n, other=1.0)
        acc = _normalize_grad(acc, q, q_norm, NORMALIZE)
    _store_rows(dq_ptr, acc, rows, n, D, q_HW, q_W, dq_sB, dq_sD, dq_sH, dq_sW, D_PAD)


@triton.jit
def info_nce_bwd_key_kernel(
    q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, q_label_ptr, k_label_ptr, q_group_ptr, k_group_ptr,
    tile_lo_ptr, tile_hi_ptr, lse_ptr, exp_weight_ptr, pos_weight_ptr, dk_ptr, tau_rows_ptr,
    n, m, D, self_offset, ignore_index, tau_ptr,
    q_HW, q_W, q_sB, q_sD, q_sH, q_sW,
    k_HW, k_W, k_sB, k_sD, k_sH, k_sW,
    dk_sB, dk_sD, dk_sH, dk_sW,
    DENOM: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TAU_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    """dk for one key tile: sum over query tiles of dL/ds (recomputed) times the queries."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    inv_tau = 1.0 / tl.load(tau_ptr)
    k = _load_rows(k_ptr, cols, m, D, k_HW, k_W, k_sB, k_sD, k_sH, k_sW, D_PAD)
    k_scale = _row_scale(k_norm_ptr, cols, m, 1.0, NORMALIZE)
    k_label, k_group = _load_ids(k_label_ptr, k_group_ptr, cols, m, ignore_index, HAS_GROUPS)
    group_lo, group_hi = _group_range(k_group, cols, m)

    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start in range(0, n, BLOCK_N):
        if _tiles_meet(tile_lo_ptr, tile_hi_ptr, start // BLOCK_N, group_lo, group_hi, HAS_GROUPS):
            rows = start + tl.arange(0, BLOCK_N)
            q, q_scale, q_label, q_group, lse, exp_weight, pos_weight = _query_tile(
                q_ptr, q_norm_ptr, q_label_ptr, q_group_ptr, lse_ptr, exp_weight_ptr, pos_weight_ptr, rows, n, D,
                q_HW, q_W, q_sB, q_sD, q_sH, q_sW, inv_tau, ignore_index, NORMALIZE, HAS_GROUPS, D_PAD)
            s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * q_scale[:, None] * k_scale[None, :]
            positive, negative = _pair_masks(rows, cols, q_label, k_label, q_group, k_group,
                                             self_offset, ignore_index, HAS_GROUPS, HAS_SELF)
            grad_s = _grad_logits(s, positive, negative, lse, exp_weight, pos_weight, DENOM)
            # q_scale already holds 1 / (|q_i| * tau): the gradient w.r.t. the unit-norm key.
            grad_s = grad_s * q_scale[:, None]
            acc += _dot(tl.trans(grad_s.to(q.dtype)), q, DOT_PRECISION, UPCAST)
    if TAU_GRAD:
        # acc_j = sum_i dL/ds_ij q_hat_i / tau, so sum_i dL/ds_ij s_ij = k_scale_j <k_j, acc_j>.
        tl.store(tau_rows_ptr + cols, k_scale * tl.sum(k.to(tl.float32) * acc, axis=1), mask=cols < m)
    if NORMALIZE:
        k_norm = tl.load(k_norm_ptr + cols, mask=cols < m, other=1.0)
        acc = _normalize_grad(acc, k, k_norm, NORMALIZE)
    _store_rows(dk_ptr, acc, cols, m, D, k_HW, k_W, dk_sB, dk_sD, dk_sH, dk_sW, D_PAD)
