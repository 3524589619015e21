"""Triton kernels of the fused masked InfoNCE.

The launchers (``info_nce.py``) sort each side's rows by (group, label) and gather them into one
contiguous, zero-padded (rows, D_PAD) copy with the rows' inverse norms (``gather_rows_kernel``).
A program owns a tile of rows of one side and loops over tiles of the other side listed for it on
the host (``_plan.py``): first the *clean* tiles, where every pair is a candidate and no pair is a
positive or a row with its own key, through a loop without masks; then the *masked* tiles, where
masks are rebuilt from dense int32 labels, groups and the self column.

Logits are never stored: each tile's ``s_ij`` comes from one ``tl.dot`` (fp32 accumulation) and
is kept in log2 units, ``x_ij * c_i`` with ``x_ij = <q_i, k_j> / |k_j|`` and the per-row scale
``c_i = log2(e) / (|q_i| tau)`` folded once per row, so each exponential is one ``exp2``.

Denominator codes: 0 = "all", 1 = "each_positive", 2 = "negatives". The temperature is read
from a one-element device tensor (it may be a learnable parameter: no host synchronisation).
"""

from __future__ import annotations

import triton
import triton.language as tl

NORM_EPS = tl.constexpr(1e-12)  # F.normalize divides by max(|x|, eps)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
DENOMINATOR_CODES = {"all": 0, "each_positive": 1, "negatives": 2}


# ----------------------------------------------------------------------------- rows in and out


@triton.jit
def _row_offsets(rows, HW, W, sB, sH, sW):
    # Row r is pixel (r // HW, (r % HW) // W, r % W); a 2-D input has HW = W = 1, sH = sW = 0.
    rows = rows.to(tl.int64)
    pixel = rows % HW
    return (rows // HW) * sB + (pixel // W) * sH + (pixel % W) * sW


@triton.jit
def gather_rows_kernel(x_ptr, perm_ptr, out_ptr, inv_norm_ptr, n, D, HW, W, sB, sD, sH, sW,
                       NORMALIZE: tl.constexpr, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    """out[i] = x[perm[i]] zero-padded to D_PAD (rows i >= n zero), inv_norm[i] = 1 / max(|x[perm[i]]|, eps)
    (1 without normalisation and on padding rows)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, D_PAD)
    inside = rows < n
    source = tl.load(perm_ptr + rows, mask=inside, other=0)
    offsets = _row_offsets(source, HW, W, sB, sH, sW)[:, None] + dims.to(tl.int64)[None, :] * sD
    x = tl.load(x_ptr + offsets, mask=inside[:, None] & (dims < D)[None, :], other=0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D_PAD + dims[None, :], x)
    if NORMALIZE:
        x = x.to(tl.float32)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), NORM_EPS)
        inv = tl.where(inside, inv, 1.0)
    else:
        inv = tl.full([BLOCK], 1.0, tl.float32)
    tl.store(inv_norm_ptr + rows, inv)


@triton.jit
def _store_grad(ptr, grad, x, inv, perm_ptr, rows, n, D, HW, W, sB, sD, sH, sW, NORMALIZE: tl.constexpr,
                D_PAD: tl.constexpr):
    """Gradient w.r.t. the raw rows x from the gradient w.r.t. x / max(|x|, eps) (F.normalize), stored
    at the rows' original places (``perm``) through the output's strides."""
    if NORMALIZE:
        unit = x.to(tl.float32) * inv[:, None]
        projected = grad - unit * tl.sum(unit * grad, axis=1)[:, None]
        grad = tl.where((inv < 1.0 / NORM_EPS)[:, None], projected, grad) * inv[:, None]
    inside = rows < n
    target = tl.load(perm_ptr + rows, mask=inside, other=0)
    dims = tl.arange(0, D_PAD)
    offsets = _row_offsets(target, HW, W, sB, sH, sW)[:, None] + dims.to(tl.int64)[None, :] * sD
    tl.store(ptr + offsets, grad, mask=inside[:, None] & (dims < D)[None, :])


@triton.jit
def _tile(ptr, tile, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    """Rows tile*BLOCK .. +BLOCK of a gathered copy: unmasked, contiguous, 16-byte aligned."""
    base = ptr + tile.to(tl.int64) * (BLOCK * D_PAD)
    return tl.load(base + tl.arange(0, BLOCK)[:, None] * D_PAD + tl.arange(0, D_PAD)[None, :])


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
def _masks(row_label, col_label, row_group, col_group, not_self,
           HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr, DENOM: tl.constexpr):
    """(positive, in the denominator set) of a masked tile; rows and columns are queries and keys
    or keys and queries (every test is symmetric but the self one, ``not_self``, built by the caller)."""
    candidate = (row_label >= 0)[:, None] & (col_label >= 0)[None, :]
    if HAS_GROUPS:
        candidate &= ((row_group[:, None] == col_group[None, :]) | (row_group < 0)[:, None]
                      | (col_group < 0)[None, :])
    if HAS_SELF:
        candidate &= not_self
    positive = candidate & (row_label[:, None] == col_label[None, :])
    if DENOM == 0:
        in_denominator = candidate
    else:
        in_denominator = candidate & ~positive
    return positive, in_denominator


@triton.jit
def _ids(label_ptr, group_ptr, idx, HAS_GROUPS: tl.constexpr):
    label = tl.load(label_ptr + idx)
    if HAS_GROUPS:
        group = tl.load(group_ptr + idx)
    else:
        group = label
    return label, group


# ----------------------------------------------------------------------------- forward


@triton.jit
def info_nce_fwd_kernel(
    q_ptr, k_ptr, q_inv_ptr, k_inv_ptr, q_label_ptr, k_label_ptr, q_group_ptr, k_group_ptr, self_col_ptr,
    order_ptr, counts_ptr, loss_ptr, valid_ptr, lse_ptr, n_pos_ptr, pos_sigmoid_ptr, tau_ptr, key_tiles,
    DENOM: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    """Per sorted query row: log2-sum-exp of its denominator set, positive count, loss, contributing flag."""
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
    n_clean = tl.load(counts_ptr + 2 * pid)
    n_masked = tl.load(counts_ptr + 2 * pid + 1)

    # Online log-sum-exp in log2 units: running max m of x (c > 0, so of the logits too) and
    # l = sum 2^(x c - m c).
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_N], tl.float32)
    for t in range(0, n_clean):
        kt = tl.load(order + t)
        k = _tile(k_ptr, kt, BLOCK_M, D_PAD)
        k_inv = tl.load(k_inv_ptr + kt * BLOCK_M + tl.arange(0, BLOCK_M))
        x = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * k_inv[None, :]
        m_new = tl.maximum(m, tl.max(x, axis=1))
        mc = m_new * c
        l = l * tl.exp2(m * c - mc) + tl.sum(tl.exp2(x * c[:, None] - mc[:, None]), axis=1)
        m = m_new

    pos_sum = tl.zeros([BLOCK_N], tl.float32)  # sum of x over positives
    n_pos = tl.zeros([BLOCK_N], tl.int32)
    n_neg = n_clean * BLOCK_M + tl.zeros([BLOCK_N], tl.int32)  # every clean pair is a negative
    for t in range(n_clean, n_clean + n_masked):
        kt = tl.load(order + t)
        cols = kt * BLOCK_M + tl.arange(0, BLOCK_M)
        k = _tile(k_ptr, kt, BLOCK_M, D_PAD)
        k_inv = tl.load(k_inv_ptr + cols)
        k_label, k_group = _ids(k_label_ptr, k_group_ptr, cols, HAS_GROUPS)
        x = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * k_inv[None, :]
        positive, in_denominator = _masks(q_label, k_label, q_group, k_group, self_col[:, None] != cols[None, :],
                                          HAS_GROUPS, HAS_SELF, DENOM)
        m_new = tl.maximum(m, tl.max(tl.where(in_denominator, x, float("-inf")), axis=1))
        # A row with nothing in its set so far keeps m = -inf: shift by 0 then (no inf - inf).
        mc = tl.where(m_new > float("-inf"), m_new * c, 0.0)
        p = tl.where(in_denominator, tl.exp2(x * c[:, None] - mc[:, None]), 0.0)
        l = l * tl.exp2(m * c - mc) + tl.sum(p, axis=1)
        m = m_new
        pos_sum += tl.sum(tl.where(positive, x, 0.0), axis=1)
        n_pos += tl.sum(positive.to(tl.int32), axis=1)
        if DENOM == 2:
            n_neg += tl.sum(in_denominator.to(tl.int32), axis=1)
    lse2 = tl.where(l > 0, m * c + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
    pos_count = tl.maximum(n_pos, 1).to(tl.float32)

    if DENOM == 1:
        # each_positive: softplus(lse_neg - s_ip) over positives needs the final lse_neg: a second
        # sweep over the masked tiles (the only ones holding positives). It also gives
        # sum_p sigmoid(lse_neg - s_ip) for the backward.
        softplus_sum = tl.zeros([BLOCK_N], tl.float32)
        sigmoid_sum = tl.zeros([BLOCK_N], tl.float32)
        for t in range(n_clean, n_clean + n_masked):
            kt = tl.load(order + t)
            cols = kt * BLOCK_M + tl.arange(0, BLOCK_M)
            k = _tile(k_ptr, kt, BLOCK_M, D_PAD)
            k_inv = tl.load(k_inv_ptr + cols)
            k_label, k_group = _ids(k_label_ptr, k_group_ptr, cols, HAS_GROUPS)
            x = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * k_inv[None, :]
            positive, _ = _masks(q_label, k_label, q_group, k_group, self_col[:, None] != cols[None, :],
                                 HAS_GROUPS, HAS_SELF, DENOM)
            z = lse2[:, None] - x * c[:, None]  # log2 units
            t2 = tl.exp2(-tl.abs(z))
            softplus = tl.maximum(z, 0.0) + tl.log2(1.0 + t2)  # log2 units
            sigmoid = tl.where(z >= 0, 1.0, t2) / (1.0 + t2)
            softplus_sum += tl.sum(tl.where(positive, softplus, 0.0), axis=1)
            sigmoid_sum += tl.sum(tl.where(positive, sigmoid, 0.0), axis=1)
        row_loss = softplus_sum * LN2 / pos_count
        tl.store(pos_sigmoid_ptr + rows, sigmoid_sum)
    else:
        row_loss = (lse2 - pos_sum * c / pos_count) * LN2

    valid = (q_label >= 0) & (n_pos > 0)
    if DENOM == 2:
        valid = valid & (n_neg > 0)
    tl.store(loss_ptr + rows, tl.where(valid, row_loss, 0.0))
    tl.store(valid_ptr + rows, valid.to(tl.int8))
    tl.store(lse_ptr + rows, lse2)
    tl.store(n_pos_ptr + rows, n_pos)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _grad_terms(e, a, b, positive, in_denominator, DENOM: tl.constexpr):
    """dL/ds of a masked tile up to a per-row factor, from e = 2^(x c - lse2) and the row weights a, b
    (broadcastable): a e on the denominator set minus b w on positives, w = 1, or sigmoid(lse - s)
    = 1 / (1 + e) for "each_positive"."""
    grad = tl.where(in_denominator, e * a, 0.0)
    if DENOM == 1:
        grad -= tl.where(positive, b / (1.0 + e), 0.0)
    else:
        grad -= tl.where(positive, b, 0.0)
    return grad


@triton.jit
def info_nce_bwd_query_kernel(
    q_ptr, k_ptr, q_inv_ptr, k_inv_ptr, q_label_ptr, k_label_ptr, q_group_ptr, k_group_ptr, self_col_ptr,
    order_ptr, counts_ptr, lse_ptr, a_ptr, b_ptr, row_scale_ptr, col_scale_ptr, tau_ptr, key_tiles,
    perm_ptr, dq_ptr, tau_rows_ptr, n, D, HW, W, sB, sD, sH, sW,
    DENOM: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TAU_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    """dq for one tile of sorted queries: sum over key tiles of dL/ds (recomputed) times the keys.

    The row's incoming gradient g_i is factored out of the tile products (``row_scale`` applies it
    after them), so the low-precision operand holds a_i p_ij - b_i w_ij <= 1 times the key's inverse
    norm and a power-of-two prescale (``col_scale``): it cannot flush to zero in fp16.
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
    col_scale = tl.load(col_scale_ptr)
    order = order_ptr + pid.to(tl.int64) * key_tiles
    n_clean = tl.load(counts_ptr + 2 * pid)
    n_masked = tl.load(counts_ptr + 2 * pid + 1)

    acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    # Clean tiles: every pair in the denominator set, no positive: a_i 2^(x c - lse2) with a_i
    # folded into the exponent.
    shift = tl.where(a > 0, lse2 - tl.log2(a), float("inf"))
    for t in range(0, n_clean):
        kt = tl.load(order + t)
        k = _tile(k_ptr, kt, BLOCK_M, D_PAD)
        k_inv = tl.load(k_inv_ptr + kt * BLOCK_M + tl.arange(0, BLOCK_M))
        x = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * k_inv[None, :]
        p = tl.exp2(x * c[:, None] - shift[:, None]) * (k_inv * col_scale)[None, :]
        acc += _dot(p.to(k.dtype), k, DOT_PRECISION, UPCAST)
    for t in range(n_clean, n_clean + n_masked):
        kt = tl.load(order + t)
        cols = kt * BLOCK_M + tl.arange(0, BLOCK_M)
        k = _tile(k_ptr, kt, BLOCK_M, D_PAD)
        k_inv = tl.load(k_inv_ptr + cols)
        k_label, k_group = _ids(k_label_ptr, k_group_ptr, cols, HAS_GROUPS)
        x = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * k_inv[None, :]
        positive, in_denominator = _masks(q_label, k_label, q_group, k_group, self_col[:, None] != cols[None, :],
                                          HAS_GROUPS, HAS_SELF, DENOM)
        e = tl.exp2(x * c[:, None] - lse2[:, None])
        grad = _grad_terms(e, a[:, None], b[:, None], positive, in_denominator, DENOM)
        grad = grad * (k_inv * col_scale)[None, :]
        acc += _dot(grad.to(k.dtype), k, DOT_PRECISION, UPCAST)

    # acc_i = sum_j dL/ds_ij * khat_j * col_scale / g_i: back to dL/dqhat_i = sum_j dL/ds_ij khat_j / tau.
    acc = acc * (tl.load(row_scale_ptr + rows) / (col_scale * tau))[:, None]
    if TAU_GRAD:
        # sum_j dL/ds_ij s_ij = <qhat_i, dL/dqhat_i> (see info_nce.py).
        tl.store(tau_rows_ptr + rows, q_inv * tl.sum(q.to(tl.float32) * acc, axis=1))
    _store_grad(dq_ptr, acc, q, q_inv, perm_ptr, rows, n, D, HW, W, sB, sD, sH, sW, NORMALIZE, D_PAD)


@triton.jit
def info_nce_bwd_key_kernel(
    q_ptr, k_ptr, q_inv_ptr, k_inv_ptr, q_label_ptr, k_label_ptr, q_group_ptr, k_group_ptr, self_col_ptr,
    order_ptr, counts_ptr, lse_ptr, a_ptr, b_ptr, scale_ptr, tau_ptr, query_tiles,
    perm_ptr, dk_ptr, tau_rows_ptr, m, D, HW, W, sB, sD, sH, sW,
    DENOM: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SELF: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TAU_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    """dk for one tile of sorted keys: sum over query tiles of dL/ds (recomputed) times the queries.

    The tile is computed transposed, (BLOCK_M keys, BLOCK_N queries). The per-query weights a_i, b_i
    carry g_i, the query's inverse norm and a power-of-two prescale (``scale``) that keeps the
    low-precision operand away from fp16's underflow; the epilogue divides it out.
    """
    pid = tl.program_id(0)
    cols = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    k = _tile(k_ptr, pid, BLOCK_M, D_PAD)
    k_inv = tl.load(k_inv_ptr + cols)
    tau = tl.load(tau_ptr)
    k_label, k_group = _ids(k_label_ptr, k_group_ptr, cols, HAS_GROUPS)
    order = order_ptr + pid.to(tl.int64) * query_tiles
    n_clean = tl.load(counts_ptr + 2 * pid)
    n_masked = tl.load(counts_ptr + 2 * pid + 1)

    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for t in range(0, n_clean):
        qt = tl.load(order + t)
        rows = qt * BLOCK_N + tl.arange(0, BLOCK_N)
        q = _tile(q_ptr, qt, BLOCK_N, D_PAD)
        c = tl.load(q_inv_ptr + rows) * (LOG2E / tau)
        lse2 = tl.load(lse_ptr + rows)
        a = tl.load(a_ptr + rows)
        x = _dot(k, tl.trans(q), DOT_PRECISION, UPCAST) * c[None, :]  # (keys, queries), log2 units / k_inv
        p = tl.exp2(x * k_inv[:, None] - lse2[None, :]) * a[None, :]
        acc += _dot(p.to(q.dtype), q, DOT_PRECISION, UPCAST)
    for t in range(n_clean, n_clean + n_masked):
        qt = tl.load(order + t)
        rows = qt * BLOCK_N + tl.arange(0, BLOCK_N)
        q = _tile(q_ptr, qt, BLOCK_N, D_PAD)
        c = tl.load(q_inv_ptr + rows) * (LOG2E / tau)
        lse2 = tl.load(lse_ptr + rows)
        a = tl.load(a_ptr + rows)
        b = tl.load(b_ptr + rows)
        q_label, q_group = _ids(q_label_ptr, q_group_ptr, rows, HAS_GROUPS)
        if HAS_SELF:
            self_col = tl.load(self_col_ptr + rows)
        else:
            self_col = q_label
        x = _dot(k, tl.trans(q), DOT_PRECISION, UPCAST) * c[None, :]  # (keys, queries)
        positive, in_denominator = _masks(k_label, q_label, k_group, q_group, cols[:, None] != self_col[None, :],
                                          HAS_GROUPS, HAS_SELF, DENOM)
        e = tl.exp2(x * k_inv[:, None] - lse2[None, :])
        grad = _grad_terms(e, a[None, :], b[None, :], positive, in_denominator, DENOM)
        acc += _dot(grad.to(q.dtype), q, DOT_PRECISION, UPCAST)

    # acc_j = sum_i dL/ds_ij * qhat_i * scale: back to dL/dkhat_j = sum_i dL/ds_ij qhat_i / tau.
    acc = acc / (tl.load(scale_ptr) * tau)
    if TAU_GRAD:
        tl.store(tau_rows_ptr + cols, k_inv * tl.sum(k.to(tl.float32) * acc, axis=1))
    _store_grad(dk_ptr, acc, k, k_inv, perm_ptr, cols, m, D, HW, W, sB, sD, sH, sW, NORMALIZE, D_PAD)


@triton.jit
def info_nce_bwd_symmetric_kernel(
    x_ptr, inv_ptr, label_ptr, group_ptr, order_ptr, counts_ptr, lse_ptr, a_ptr, b_ptr, alpha_ptr, beta_ptr,
    tile_max_ptr, scale_ptr, tau_ptr, tiles, perm_ptr, dx_ptr, tau_rows_ptr, n, D, HW, W, sB, sD, sH, sW,
    DENOM: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GROUPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TAU_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    """Self-contrast backward in one kernel: dx_r = sum_j (dL/ds_rj + dL/ds_jr) xhat_j / tau.

    s is symmetric, so one logit tile serves both terms: 2 products per logit instead of the 4 of
    separate dq and dk kernels, and every gradient row is written once (no atomics).

    On clean tiles both terms come from one exponential: with K the column tile's largest
    log2-sum-exp, a_r 2^(x c - L_r) + a_j 2^(x c - L_j) = 2^(x c - K) (alpha_r + beta_j), where
    alpha_r = a_r 2^(K - L_r) and beta_j = a_j 2^(K - L_j) (the host keeps K - L within
    _plan.SYMMETRIC_SPREAD on clean tiles, see docs/kernels.md). Masked tiles use one exponential per
    term. a and b carry g, the prescale and (beta, on the column side) the column's inverse norm.
    """
    tl.static_assert(BLOCK_N == BLOCK_M, "square tiles: rows and columns are one set")
    BLOCK: tl.constexpr = BLOCK_N
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    xr = _tile(x_ptr, pid, BLOCK, D_PAD)
    r_inv = tl.load(inv_ptr + rows)
    tau = tl.load(tau_ptr)
    c = r_inv * (LOG2E / tau)
    r_label, r_group = _ids(label_ptr, group_ptr, rows, HAS_GROUPS)
    r_lse2 = tl.load(lse_ptr + rows)
    r_a = tl.load(a_ptr + rows)
    r_b = tl.load(b_ptr + rows)
    r_alpha = tl.load(alpha_ptr + rows)  # a_r 2^(max of its tile - L_r)
    r_max = tl.load(tile_max_ptr + pid)
    order = order_ptr + pid.to(tl.int64) * tiles
    n_clean = tl.load(counts_ptr + 2 * pid)
    n_masked = tl.load(counts_ptr + 2 * pid + 1)

    acc = tl.zeros([BLOCK, D_PAD], tl.float32)
    for t in range(0, n_clean):
        ct = tl.load(order + t)
        cols = ct * BLOCK + tl.arange(0, BLOCK)
        xc = _tile(x_ptr, ct, BLOCK, D_PAD)
        c_inv = tl.load(inv_ptr + cols)
        beta = tl.load(beta_ptr + cols)  # a_j |x_j|^-1 2^(K - L_j), K = this column tile's largest L
        k_max = tl.load(tile_max_ptr + ct)
        alpha = r_alpha * tl.exp2(k_max - r_max)
        x = _dot(xr, tl.trans(xc), DOT_PRECISION, UPCAST) * c_inv[None, :]
        e = tl.exp2(x * c[:, None] - k_max)
        grad = e * (alpha[:, None] * c_inv[None, :] + beta[None, :])
        acc += _dot(grad.to(xc.dtype), xc, DOT_PRECISION, UPCAST)
    for t in range(n_clean, n_clean + n_masked):
        ct = tl.load(order + t)
        cols = ct * BLOCK + tl.arange(0, BLOCK)
        xc = _tile(x_ptr, ct, BLOCK, D_PAD)
        c_inv = tl.load(inv_ptr + cols)
        c_label, c_group = _ids(label_ptr, group_ptr, cols, HAS_GROUPS)
        c_lse2 = tl.load(lse_ptr + cols)
        c_a = tl.load(a_ptr + cols)
        c_b = tl.load(b_ptr + cols)
        x = _dot(xr, tl.trans(xc), DOT_PRECISION, UPCAST) * c_inv[None, :]
        s2 = x * c[:, None]
        positive, in_denominator = _masks(r_label, c_label, r_group, c_group, rows[:, None] != cols[None, :],
                                          HAS_GROUPS, True, DENOM)
        e_r = tl.exp2(s2 - r_lse2[:, None])
        e_c = tl.exp2(s2 - c_lse2[None, :])
        grad = tl.where(in_denominator, e_r * r_a[:, None] + e_c * c_a[None, :], 0.0)
        if DENOM == 1:
            grad -= tl.where(positive, r_b[:, None] / (1.0 + e_r) + c_b[None, :] / (1.0 + e_c), 0.0)
        else:
            grad -= tl.where(positive, r_b[:, None] + c_b[None, :], 0.0)
        grad = grad * c_inv[None, :]
        acc += _dot(grad.to(xc.dtype), xc, DOT_PRECISION, UPCAST)

    acc = acc / (tl.load(scale_ptr) * tau)
    if TAU_GRAD:
        # sum_j (dL/ds_rj + dL/ds_jr) s_rj; summed over r it counts every pair twice.
        tl.store(tau_rows_ptr + rows, r_inv * tl.sum(xr.to(tl.float32) * acc, axis=1))
    _store_grad(dx_ptr, acc, xr, r_inv, perm_ptr, rows, n, D, HW, W, sB, sD, sH, sW, NORMALIZE, D_PAD)
