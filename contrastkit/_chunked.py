"""The memory-lean PyTorch backend of the masked InfoNCE.

Query rows are processed in chunks against all keys, so no more than a chunk x M block of
logits exists at once, in the forward and in the backward. The forward keeps one statistic per
row (the log-sum-exp of its denominator set); the backward recomputes each block's logits
from it and applies the closed-form gradient, so autograd never stores a block.

Both directions are ``torch.library`` custom ops with fake implementations, so
``torch.compile`` traces a loss built on them without a graph break.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._reference import compute_dtype, contributing_rows, masked_logsumexp, pair_masks, prepare

# About 1M logits per block: the few float32 temporaries of a block stay within tens of MB
# at any M, and small blocks stay cache-friendly on CPUs.
_BLOCK_ELEMENTS = 1 << 20


def default_chunk_size(num_queries: int, num_keys: int) -> int:
    return max(1, min(num_queries, _BLOCK_ELEMENTS // max(num_keys, 1)))


def _chunk_bounds(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _block(query, key_rows, labels, key_labels, groups, key_groups, self_offset, temperature,
           normalize, ignore_index, start, stop):
    """Logits (already divided by the temperature) and masks of query rows start..stop.

    With groups, only the keys of the groups present in the chunk can be candidates, so the
    block is computed against those columns alone (``columns``; None means all keys): per-image
    negatives then cost one image's keys per chunk instead of the whole batch's.
    """
    q = prepare(query[start:stop], temperature, normalize)
    chunk_groups = None if groups is None else groups[start:stop]
    columns = None
    if chunk_groups is not None:
        in_chunk_groups = torch.isin(key_groups, chunk_groups)
        if not bool(in_chunk_groups.all()):
            columns = in_chunk_groups.nonzero().squeeze(1)
            key_rows, key_labels, key_groups = key_rows[columns], key_labels[columns], key_groups[columns]
    s = q @ key_rows.T
    pos, neg = pair_masks(labels[start:stop], key_labels, chunk_groups, key_groups, ignore_index, start,
                          self_offset, columns)
    return q, key_rows, s, pos, neg, columns


@torch.library.custom_op("contrastkit::info_nce_rows_chunked", mutates_args=())
def info_nce_rows_chunked(
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    key_labels: torch.Tensor,
    groups: torch.Tensor | None,
    key_groups: torch.Tensor | None,
    self_offset: int | None,
    temperature: float,
    normalize: bool,
    denominator: str,
    ignore_index: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (per-row loss, contributing mask, per-row log-sum-exp of the denominator set)."""
    n = query.shape[0]
    dtype = compute_dtype(query.dtype)
    loss = torch.zeros(n, dtype=dtype, device=query.device)
    valid = torch.zeros(n, dtype=torch.bool, device=query.device)
    lse = torch.zeros(n, dtype=dtype, device=query.device)
    k = prepare(key, None, normalize)
    for start, stop in _chunk_bounds(n, chunk_size):
        _, _, s, pos, neg, _ = _block(query, k, labels, key_labels, groups, key_groups, self_offset,
                                      temperature, normalize, ignore_index, start, stop)
        if s.shape[1] == 0:  # no key shares a group with these queries: nothing contributes
            lse[start:stop] = float("-inf")
            continue
        n_pos = pos.sum(dim=1)
        row_valid = contributing_rows(labels[start:stop], n_pos, neg.sum(dim=1), denominator, ignore_index)
        row_lse = masked_logsumexp(s, (pos | neg) if denominator == "all" else neg)
        if denominator == "each_positive":
            per_pair = torch.where(pos, F.softplus(row_lse[:, None] - s), 0.0)
            row_loss = per_pair.sum(dim=1) / n_pos.clamp_min(1)
        else:
            row_loss = row_lse - torch.where(pos, s, 0.0).sum(dim=1) / n_pos.clamp_min(1)
        loss[start:stop] = torch.where(row_valid, row_loss, 0.0)
        valid[start:stop] = row_valid
        lse[start:stop] = row_lse
    return loss, valid, lse


@info_nce_rows_chunked.register_fake
def _(query, key, labels, key_labels, groups, key_groups, self_offset, temperature, normalize,
      denominator, ignore_index, chunk_size):
    n = query.shape[0]
    dtype = compute_dtype(query.dtype)
    return (query.new_empty(n, dtype=dtype), query.new_empty(n, dtype=torch.bool),
            query.new_empty(n, dtype=dtype))


def _normalize_backward(x: torch.Tensor, grad_normalized: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Gradient with respect to the raw rows of ``F.normalize(x)`` (x / max(|x|, eps))."""
    if not normalize:
        return grad_normalized.to(x.dtype)
    out_dtype = x.dtype
    x = x.to(grad_normalized.dtype)
    norm = x.norm(dim=1, keepdim=True)
    scaled = norm > 1e-12
    unit = x / torch.where(scaled, norm, 1.0)
    projected = grad_normalized - unit * (unit * grad_normalized).sum(dim=1, keepdim=True)
    grad = torch.where(scaled, projected / torch.where(scaled, norm, 1.0), grad_normalized / 1e-12)
    return grad.to(out_dtype)


def _exp_where(mask: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """exp(shifted) where mask, exactly 0 elsewhere, in place: entries outside the mask may be
    far above the log-sum-exp (the query itself, ignored keys), and exp() of them would overflow."""
    return shifted.masked_fill_(~mask, float("-inf")).exp_()


@torch.library.custom_op("contrastkit::info_nce_rows_chunked_backward", mutates_args=())
def info_nce_rows_chunked_backward(
    grad_loss: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    key_labels: torch.Tensor,
    groups: torch.Tensor | None,
    key_groups: torch.Tensor | None,
    valid: torch.Tensor,
    lse: torch.Tensor,
    self_offset: int | None,
    temperature: float,
    normalize: bool,
    denominator: str,
    ignore_index: int,
    chunk_size: int,
    need_query_grad: bool,
    need_key_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = compute_dtype(query.dtype)
    k = prepare(key, None, normalize)
    grad_q = torch.zeros(query.shape, dtype=dtype, device=query.device)
    grad_k = torch.zeros(k.shape, dtype=dtype, device=query.device)
    # Only rows with a contribution and a non-empty denominator set have a gradient (an
    # "each_positive" row without negatives is constant). Giving the others an infinite
    # log-sum-exp turns their exp(s - lse) into exact zeros, however large s is.
    live = valid & torch.isfinite(lse)
    g_all = torch.where(live, grad_loss.to(dtype), 0.0)
    lse_safe = torch.where(live, lse, float("inf"))
    for start, stop in _chunk_bounds(query.shape[0], chunk_size):
        g = g_all[start:stop]
        if not bool(g.ne(0).any()):
            continue
        q, block_keys, s, pos, neg, columns = _block(query, k, labels, key_labels, groups, key_groups,
                                                     self_offset, temperature, normalize, ignore_index,
                                                     start, stop)
        coef = g / pos.sum(dim=1).clamp_min(1)
        row_lse = lse_safe[start:stop, None]
        # The block's logits are not needed after this: reuse their storage (CPU allocations of
        # a block cost as much as a pass over it).
        shifted = s.sub_(row_lse)
        if denominator == "each_positive":
            # d/ds_p = -sigmoid(lse_neg - s_p) / |P|;  d/ds_n = softmax_neg(s)_n * sum_p sigmoid(.) / |P|
            pos_weight = torch.sigmoid(-shifted).mul_(pos)
            neg_scale = coef * pos_weight.sum(dim=1)
            grad_s = _exp_where(neg, shifted).mul_(neg_scale[:, None])
            grad_s.sub_(pos_weight.mul_(coef[:, None]))
        else:
            denominator_set = neg if denominator == "negatives" else pos | neg
            grad_s = _exp_where(denominator_set, shifted).mul_(g[:, None])
            grad_s.sub_(pos * coef[:, None])
        if need_query_grad:
            grad_q[start:stop] = grad_s @ block_keys
        if need_key_grad:
            if columns is None:
                grad_k.addmm_(grad_s.T, q)
            else:
                grad_k.index_add_(0, columns, grad_s.T @ q)
    # s = (q_hat / temperature) . k_hat
    grad_q = _normalize_backward(query, grad_q / temperature, normalize) if need_query_grad else grad_q.to(query.dtype)
    grad_k = _normalize_backward(key, grad_k, normalize) if need_key_grad else grad_k.to(key.dtype)
    return grad_q, grad_k


@info_nce_rows_chunked_backward.register_fake
def _(grad_loss, query, key, *args):
    return torch.empty_like(query), torch.empty_like(key)


def _setup_context(ctx, inputs, output):
    (query, key, labels, key_labels, groups, key_groups, self_offset, temperature, normalize,
     denominator, ignore_index, chunk_size) = inputs
    _, valid, lse = output
    ctx.save_for_backward(query, key, labels, key_labels, groups, key_groups, valid, lse)
    ctx.options = (self_offset, temperature, normalize, denominator, ignore_index, chunk_size)


def _backward(ctx, grad_loss, _grad_valid, _grad_lse):
    query, key, labels, key_labels, groups, key_groups, valid, lse = ctx.saved_tensors
    need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_q, grad_k = info_nce_rows_chunked_backward(
        grad_loss, query, key, labels, key_labels, groups, key_groups, valid, lse,
        *ctx.options, need_q, need_k,
    )
    return (grad_q if need_q else None, grad_k if need_k else None) + (None,) * 10


info_nce_rows_chunked.register_autograd(_backward, setup_context=_setup_context)
