"""The memory-lean PyTorch backend of the masked InfoNCE.

Query rows are processed in chunks against all keys, so no more than a chunk x M block of
logits exists at once, in the forward and in the backward. The forward keeps one statistic per
row (the log-sum-exp of its denominator set); the backward recomputes each block's logits
from it and applies the closed-form gradient, so autograd never stores a block.

Both directions are ``torch.library`` custom ops with fake implementations, so
``torch.compile`` traces a loss built on them without a graph break. Their schemas come from
:mod:`contrastkit._options`: the tensors of :class:`OpInputs` and the options as one string.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ._masks import contributing_rows, inverse_norm, masked_logsumexp, pair_masks, prepare
from ._options import SHARED, InfoNCEOptions, OpInputs, input_gradients, op_schema, split_op_args
from ._validation import as_rows, compute_dtype

# About 1M logits per block: the few float32 temporaries of a block stay within tens of MB
# at any M, and small blocks stay cache-friendly on CPUs.
_BLOCK_ELEMENTS = 1 << 20


def default_chunk_size(num_queries: int, num_keys: int) -> int:
    return max(1, min(num_queries, _BLOCK_ELEMENTS // max(num_keys, 1)))


def _chunk_bounds(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _block(query, keys, inputs: OpInputs, options: InfoNCEOptions, start: int, stop: int):
    """Logits (already divided by the temperature) and masks of query rows start..stop.

    ``keys`` are the prepared (normalised) keys. With groups, only the keys of the groups present
    in the chunk (and ``SHARED`` keys) can be candidates, so the block is computed against those
    columns alone (``columns``; None means all keys): per-image negatives then cost one image's
    keys per chunk instead of the whole batch's.
    """
    q = prepare(query[start:stop], inputs.temperature, options.normalize)
    key_labels, key_groups = inputs.key_labels, inputs.key_groups
    chunk_groups = None if inputs.groups is None else inputs.groups[start:stop]
    columns = None
    if chunk_groups is not None and not bool((chunk_groups == SHARED).any()):
        in_chunk_groups = torch.isin(key_groups, chunk_groups) | (key_groups == SHARED)
        if not bool(in_chunk_groups.all()):
            columns = in_chunk_groups.nonzero().squeeze(1)
            keys, key_labels, key_groups = keys[columns], key_labels[columns], key_groups[columns]
    s = q @ keys.T
    pos, neg = pair_masks(inputs.labels[start:stop], key_labels, chunk_groups, key_groups, options.ignore_index,
                          start, options.self_key_offset, columns)
    return q, keys, s, pos, neg, columns


def _forward(*args):
    """(per-row loss, contributing mask, per-row log-sum-exp of the denominator set)."""
    _, inputs, _, options = split_op_args(args)
    query, denominator = inputs.query, options.denominator
    n = query.shape[0]
    dtype = compute_dtype(query.dtype)
    loss = torch.zeros(n, dtype=dtype, device=query.device)
    valid = torch.zeros(n, dtype=torch.bool, device=query.device)
    lse = torch.zeros(n, dtype=dtype, device=query.device)
    keys = prepare(inputs.key, None, options.normalize)
    for start, stop in _chunk_bounds(n, options.chunk_size):
        _, _, s, pos, neg, _ = _block(query, keys, inputs, options, start, stop)
        if s.shape[1] == 0:  # no key shares a group with these queries: nothing contributes
            lse[start:stop] = float("-inf")
            continue
        n_pos = pos.sum(dim=1)
        row_valid = contributing_rows(inputs.labels[start:stop], n_pos, neg.sum(dim=1), denominator,
                                      options.ignore_index)
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


def _forward_fake(*args):
    query = args[0]
    n, dtype = query.shape[0], compute_dtype(query.dtype)
    return (query.new_empty(n, dtype=dtype), query.new_empty(n, dtype=torch.bool), query.new_empty(n, dtype=dtype))


forward_op = torch.library.custom_op("contrastkit::info_nce_rows_chunked", _forward, mutates_args=(),
                                     schema=op_schema(returns="(Tensor, Tensor, Tensor)"))
forward_op.register_fake(_forward_fake)


def _normalize_backward(x: torch.Tensor, grad_normalized: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Gradient with respect to the raw rows of ``_masks.normalized(x)`` = x·r, r = (|x|² + floor²)^-1/2:
    r·(g - u (u·g)) with u = x·r."""
    if not normalize:
        return grad_normalized.to(x.dtype)
    out_dtype = x.dtype
    x = x.to(grad_normalized.dtype)
    inverse = inverse_norm(x, dim=1)
    unit = x * inverse
    grad = (grad_normalized - unit * (unit * grad_normalized).sum(dim=1, keepdim=True)) * inverse
    return grad.to(out_dtype)


def _exp_where(mask: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """exp(shifted) where mask, exactly 0 elsewhere, in place: entries outside the mask may be
    far above the log-sum-exp (the query itself, ignored keys), and exp() of them would overflow."""
    return shifted.masked_fill_(~mask, float("-inf")).exp_()


def _backward(*args):
    """(grad query, grad key, grad temperature) from the forward's per-row statistics.

    With s = (q_hat / tau) . k_hat, dL/dtau = -(1/tau) sum_ij dL/ds_ij s_ij, and
    sum_j dL/ds_ij s_ij = <q_hat_i / tau, sum_j dL/ds_ij k_hat_j>: the temperature's gradient is the
    dot product of each prepared query row with its own (pre-normalisation) query gradient.
    """
    (grad_loss,), inputs, (valid, lse, need_query, need_key, need_temperature), options = split_op_args(args, 1)
    query, key, temperature, denominator = inputs.query, inputs.key, inputs.temperature, options.denominator
    dtype = compute_dtype(query.dtype)
    keys = prepare(key, None, options.normalize)
    grad_q = torch.zeros(query.shape, dtype=dtype, device=query.device)
    grad_k = torch.zeros(keys.shape, dtype=dtype, device=query.device)
    grad_t = torch.zeros((), dtype=dtype, device=query.device)
    # Only rows with a contribution and a non-empty denominator set have a gradient (an
    # "each_positive" row without negatives is constant). Giving the others an infinite
    # log-sum-exp turns their exp(s - lse) into exact zeros, however large s is.
    live = valid & torch.isfinite(lse)
    g_all = torch.where(live, grad_loss.to(dtype), 0.0)
    lse_safe = torch.where(live, lse, float("inf"))
    for start, stop in _chunk_bounds(query.shape[0], options.chunk_size):
        g = g_all[start:stop]
        q, block_keys, s, pos, neg, columns = _block(query, keys, inputs, options, start, stop)
        coef = g / pos.sum(dim=1).clamp_min(1)
        # The block's logits are not needed after this: reuse their storage (CPU allocations of
        # a block cost as much as a pass over it).
        shifted = s.sub_(lse_safe[start:stop, None])
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
        if need_query or need_temperature:
            grad_rows = grad_s @ block_keys
            grad_q[start:stop] = grad_rows
            if need_temperature:
                grad_t = grad_t + (q * grad_rows).sum()
        if need_key:
            if columns is None:
                grad_k.addmm_(grad_s.T, q)
            else:
                grad_k.index_add_(0, columns, grad_s.T @ q)
    scale = 1 / temperature.detach().to(dtype)
    grad_q = _normalize_backward(query, grad_q * scale, options.normalize) if need_query else grad_q.to(query.dtype)
    grad_k = _normalize_backward(key, grad_k, options.normalize) if need_key else grad_k.to(key.dtype)
    return grad_q, grad_k, (-grad_t * scale).to(temperature.dtype)


def _backward_fake(*args):
    _, inputs, _, _ = split_op_args(args, 1)
    return torch.empty_like(inputs.query), torch.empty_like(inputs.key), torch.empty_like(inputs.temperature)


backward_op = torch.library.custom_op(
    "contrastkit::info_nce_rows_chunked_backward", _backward, mutates_args=(),
    schema=op_schema("Tensor grad_loss", "Tensor valid, Tensor lse, bool need_query, bool need_key, "
                     "bool need_temperature", "(Tensor, Tensor, Tensor)"))
backward_op.register_fake(_backward_fake)


def _setup_context(ctx, inputs, output):
    _, valid, lse = output
    ctx.save_for_backward(*inputs[:-1], valid, lse)
    ctx.options = inputs[-1]


def _autograd_backward(ctx, grad_loss, _grad_valid, _grad_lse):
    *saved, valid, lse = ctx.saved_tensors
    need = dict(zip(OpInputs._fields, ctx.needs_input_grad, strict=False))
    grad_q, grad_k, grad_t = backward_op(grad_loss, *saved, valid, lse, need["query"], need["key"],
                                         need["temperature"], ctx.options)
    return input_gradients(query=grad_q if need["query"] else None, key=grad_k if need["key"] else None,
                           temperature=grad_t if need["temperature"] else None)


forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "second derivatives (create_graph=True, e.g. a gradient penalty) of info_nce are not implemented "
        "on the chunked 'torch' backend, whose backward is a fused custom op: pass backend='dense' (or "
        "'reference'), which autograd differentiates twice")


backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def chunked_rows(inputs: OpInputs, options: InfoNCEOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and contributing mask, computed a block of query rows at a time."""
    inputs = inputs._replace(query=as_rows(inputs.query), key=as_rows(inputs.key))
    if options.chunk_size is None:
        options = dataclasses.replace(options, chunk_size=default_chunk_size(inputs.query.shape[0],
                                                                              inputs.key.shape[0]))
    loss, valid, _ = forward_op(*inputs, options.encode())
    return loss, valid
