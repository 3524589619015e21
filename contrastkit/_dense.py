"""The lean dense path of the masked InfoNCE: every logit at once, by batched products.

When the groups are B equal, contiguous blocks of queries and keys (per-image negatives: B
images of G cells each), only the B diagonal blocks can hold candidates, so the logits are one
(B, Gq, Gk) batched product: memory B·Gq·Gk, not N·M. Otherwise the (N, M) matrix is one block
and the groups are a mask. Paired views (key i the one positive of query i) need no masks at
all: the loss is a row's log-sum-exp minus its diagonal logit.

Autograd differentiates it. It is the path for problems small enough that a handful of ops over
all logits beats the chunked loop's or the kernels' bookkeeping (``_backends.DENSE_MAX_LOGITS``).
Unlike ``_reference.py`` (the specification) it is written for few device ops and no host sync.
"""

from __future__ import annotations

import torch

from ._masks import contributing_rows, inverse_norm, normalized, same_group
from ._options import InfoNCEOptions, OpInputs
from ._validation import as_rows, in_compute_dtype, num_rows


def block_count(options: InfoNCEOptions, num_queries: int, num_keys: int) -> int | None:
    """The number of diagonal blocks the dense path can compute separately, or None for one block."""
    blocks, offset = options.blocks, options.self_key_offset
    if blocks is None or num_queries % blocks or num_keys % blocks:
        return None
    if offset is not None and (offset != 0 or num_queries != num_keys):
        return None  # a query's own key would not sit on its block's diagonal
    return blocks


def dense_logits(num_queries: int, num_keys: int, options: InfoNCEOptions) -> int:
    """How many logits the dense path forms for this call."""
    blocks = block_count(options, num_queries, num_keys) or 1
    return num_queries * num_keys // blocks


class _ScaledRows(torch.autograd.Function):
    """x / (τ sqrt(|x|² + floor²)) per row (``_masks.normalized``, then divided by τ), its backward
    written out: f (g - out τ² (out·g)) with f = 1 / (τ sqrt(|x|² + floor²)). Autograd's backward
    of the same few ops costs twice the device ops, and this path exists for problems where the
    launches are the cost. Under ``create_graph`` the plain formula is differentiated instead."""

    @staticmethod
    def forward(ctx, x, temperature, dim):
        factor = inverse_norm(x, dim=dim)
        if temperature is not None:
            factor = factor.div_(temperature)
        out = x * factor
        ctx.dim = dim
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, out, factor, temperature)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out, factor, temperature = ctx.saved_tensors
        dim = ctx.dim
        if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
            with torch.enable_grad():
                inputs = [t for t in (x, temperature) if t is not None]
                plain = normalized(x, dim) if temperature is None else normalized(x, dim) / temperature
                grads = torch.autograd.grad(plain, inputs, grad, create_graph=True, allow_unused=True)
            return grads[0], (grads[1] if temperature is not None else None), None
        needs_x, needs_t, _ = ctx.needs_input_grad
        return (*_scaled_rows_backward(grad, out, factor, temperature, dim, needs_x, needs_t), None)


def _scaled_rows_backward(grad, out, factor, temperature, dim, needs_x, needs_t):
    """The gradients of out = x f (f = 1 / (τ sqrt(|x|² + floor²)), τ None for 1) given d out: for x,
    f (g - out τ² (out·g)); for τ, -Σ (out·g) / τ. None where not needed."""
    dot = (out * grad).sum(dim=dim, keepdim=True)
    grad_t = dot.sum().div(temperature).neg() if needs_t and temperature is not None else None
    if not needs_x:
        return None, grad_t
    coefficient = dot if temperature is None else dot * temperature.square()
    return torch.addcmul(grad, out, coefficient, value=-1).mul_(factor), grad_t


def _channel_blocks(x: torch.Tensor, blocks: int) -> tuple[torch.Tensor, int]:
    """(blocks, rows, D) rows, or a map of ``blocks`` images as (B, C, H·W) without a copy, and the
    dimension that holds the channels: a map's channels are reduced where they lie, which is
    contiguous for every cell (a strided reduction over a transposed view costs 1.5x)."""
    if x.dim() == 4 and x.shape[0] == blocks:
        return x.flatten(2), 1
    return as_rows(x).reshape(blocks, -1, x.shape[1]), 2


def _cells_first(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return x.transpose(1, 2) if channel_dim == 1 else x


def _paired_logits(q, k, temperature, channel_dim, wide=True):
    """Normalised rows (q divided by τ too), their per-row scales and the (B, G, G) logits (the
    norms' sums of squares in float64 unless not ``wide``: see ``inverse_norm``)."""
    q_scale = inverse_norm(q, dim=channel_dim, wide=wide)
    q_scale = q_scale / temperature if torch.is_grad_enabled() else q_scale.div_(temperature)
    k_scale = inverse_norm(k, dim=channel_dim, wide=wide)
    q_unit, k_unit = q * q_scale, k * k_scale
    s = torch.bmm(_cells_first(q_unit, channel_dim), _cells_first(k_unit, channel_dim).transpose(1, 2))
    return q_unit, k_unit, q_scale, k_scale, s


class _PairedBlocks(torch.autograd.Function):
    """Paired views in B blocks (key i the one positive of query i, the keys of its block its
    candidates): loss_i = logsumexp_j s_ij - s_ii with s the (B, G, G) cosines over τ; each side a
    (B, C, H, W) map of B images or (B, G, D) / (B, C, G) blocks. The forward
    records nothing and the backward is written out — softmax minus the identity, one batched
    product per side that needs a gradient, the normalisation's backward — because at the sizes
    this path serves (cross-level contrast: 8 images of 25 cells) the call's host time is the cost:
    autograd over the same ops takes twice the launches. Under ``create_graph`` the plain formula is
    differentiated instead."""

    @staticmethod
    def forward(ctx, q, k, temperature, channel_dim, wide):
        # Maps of (B, C, H, W) enter as they are and are flattened here, where the view costs autograd nothing.
        ctx.map_shapes = q.shape if q.dim() == 4 else None, k.shape if k.dim() == 4 else None
        inputs = q, k, temperature
        q, k = _flat_map(q), _flat_map(k)
        q_unit, k_unit, q_scale, k_scale, s = _paired_logits(q, k, temperature, channel_dim, wide)
        # loss_i = logsumexp_j s_ij - s_ii = -log_softmax(s)_ii: one fused op (``logsumexp`` takes ten
        # to guard infinite maxima), and its exponential is the softmax the backward needs.
        log_p = torch.log_softmax(s, dim=2)
        ctx.channel_dim = channel_dim
        ctx.save_for_backward(*inputs, q_unit, k_unit, q_scale, k_scale, log_p)
        # Flat (N,) rows: a reshape outside would be one more node for autograd to run.
        return log_p.diagonal(dim1=1, dim2=2).neg().reshape(-1)

    @staticmethod
    def backward(ctx, grad):
        q, k, temperature, q_unit, k_unit, q_scale, k_scale, log_p = ctx.saved_tensors
        dim, (needs_q, needs_k, needs_t, _, _) = ctx.channel_dim, ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
            with torch.enable_grad():
                inputs = [t for t, needed in ((q, needs_q), (k, needs_k), (temperature, needs_t)) if needed]
                plain = _paired_logits(_flat_map(q), _flat_map(k), temperature, dim)[-1]
                loss = torch.log_softmax(plain, dim=2).diagonal(dim1=1, dim2=2).neg().reshape(-1)
                found = iter(torch.autograd.grad(loss, inputs, grad, create_graph=True))
            return (next(found) if needs_q else None, next(found) if needs_k else None,
                    next(found) if needs_t else None, None, None)
        if grad.dtype != log_p.dtype:  # under autocast the loss's consumer may send a half gradient
            grad = grad.to(log_p.dtype)
        grad = grad.reshape(log_p.shape[:2])
        d_logits = log_p.exp().mul_(grad[..., None])  # softmax x grad
        d_logits.diagonal(dim1=1, dim2=2).sub_(grad)
        grad_q = grad_k = grad_t = None
        if needs_q or needs_t:
            # d q_unit; (B, C, G) = k (B, C, G) @ d_logitsᵀ for maps, (B, G, D) = d_logits @ k for rows
            d_unit = (torch.bmm(k_unit, d_logits.transpose(1, 2)) if dim == 1 else torch.bmm(d_logits, k_unit))
            grad_q, grad_t = _scaled_rows_backward(d_unit, q_unit, q_scale, temperature, dim, needs_q, needs_t)
        if needs_k:
            d_unit = (torch.bmm(q_unit, d_logits) if dim == 1 else torch.bmm(d_logits.transpose(1, 2), q_unit))
            grad_k, _ = _scaled_rows_backward(d_unit, k_unit, k_scale, None, dim, True, False)
        q_shape, k_shape = ctx.map_shapes
        if grad_q is not None and q_shape is not None:
            grad_q = grad_q.view(q_shape)
        if grad_k is not None and k_shape is not None:
            grad_k = grad_k.view(k_shape)
        return grad_q, grad_k, grad_t, None, None


def _flat_map(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2) if x.dim() == 4 else x


def _paired_blocks(query: torch.Tensor, key: torch.Tensor, temperature: torch.Tensor, blocks: int,
                   wide: bool = True) -> torch.Tensor:
    """(N,) paired-view losses of B blocks of G = N / B rows, normalised rows (see :class:`_PairedBlocks`;
    ``wide``: ``InfoNCEOptions.wide_norms``)."""
    q, k = in_compute_dtype(query), in_compute_dtype(key)
    if q.dim() == 4 and k.dim() == 4 and q.shape[0] == blocks and k.shape[0] == blocks:
        q_dim = 1  # maps of B images: the function flattens them
    else:
        q, q_dim = _channel_blocks(q, blocks)
        k, k_dim = _channel_blocks(k, blocks)
        if q_dim != k_dim:  # a map against rows: both as rows
            q, k = _cells_first(q, q_dim), _cells_first(k, k_dim)
            q_dim = 2
    device = q.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        # Under autocast the products would run in half precision: the loss accumulates in the compute dtype.
        with torch.autocast(device, enabled=False):
            return _paired_blocks(query, key, temperature, blocks, wide)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or temperature.requires_grad):
        return _PairedBlocks.apply(q, k, temperature, q_dim, wide)
    s = _paired_logits(_flat_map(q), _flat_map(k), temperature, q_dim, wide)[-1]
    return torch.log_softmax(s, dim=2).diagonal(dim1=1, dim2=2).neg().reshape(-1)


def _scaled(x: torch.Tensor, normalize: bool, temperature: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Rows (along ``dim``) in the compute dtype, L2-normalised (``_masks.normalized``) and divided by
    τ if given, with one per-row scale (τ joins it instead of costing a pass over the rows)."""
    x = in_compute_dtype(x)
    if normalize:
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (temperature is not None and temperature.requires_grad))
        if needs_grad:
            return _ScaledRows.apply(x, temperature, dim)
        # No backward to write out (detached keys): the same ops without autograd.Function's
        # Python overhead, a third of this path's host time at the papers' sizes.
        scale = inverse_norm(x, dim)
        return x * (scale if temperature is None else scale.div_(temperature))
    return x if temperature is None else x / temperature


def _paired_without_masks(options: InfoNCEOptions, group_mask: bool) -> bool:
    """Paired views in which every query has exactly its own key as positive and every key of its
    block as a candidate (ids are 0..N-1, so none equals a negative ignore_index)."""
    return options.paired and not group_mask and options.self_key_offset is None and options.ignore_index < 0


def takes_paired_blocks(options: InfoNCEOptions, group_mask: bool) -> bool:
    """Whether the rows are :class:`_PairedBlocks`'s: normalised paired views without masks (``group_mask``:
    group ids other than equal blocks). Every query is a row and every key a candidate of each query of its
    block, with logits at most 1/τ, so the rows are finite exactly when the embeddings are (and τ is
    valid): the loss screens them."""
    # With one positive, "each_positive" has the same denominator as "all".
    return options.normalize and options.denominator != "negatives" and _paired_without_masks(options, group_mask)


def dense_block_rows(inputs: OpInputs, options: InfoNCEOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-query loss (0 where the query does not contribute) and the contributing mask (None when
    every query contributes, which the structure alone shows for paired views)."""
    if takes_paired_blocks(options, options.blocks is None and inputs.groups is not None):
        # (info_nce has checked that the blocks divide N and M.)
        return _paired_blocks(inputs.query, inputs.key, inputs.temperature, options.blocks or 1,
                              options.wide_norms), None
    n, m = num_rows(inputs.query), num_rows(inputs.key)
    blocks = block_count(options, n, m)
    group_mask = blocks is None and inputs.groups is not None
    denominator, ignore_index, offset = options.denominator, options.ignore_index, options.self_key_offset
    paired = _paired_without_masks(options, group_mask)
    q, q_dim = _channel_blocks(inputs.query, blocks or 1)
    k, k_dim = _channel_blocks(inputs.key, blocks or 1)
    q = _scaled(q, options.normalize, inputs.temperature, q_dim)
    k = _scaled(k, options.normalize, None, k_dim)
    if q_dim == 1 and k_dim == 2:
        # A map's cells against rows of keys (prototype means): the product as (B, keys, cells) keeps
        # the map's layout, so its gradient reaches the map without a transposing copy.
        s = torch.bmm(k, q).transpose(1, 2)
    else:
        s = torch.bmm(_cells_first(q, q_dim), _cells_first(k, k_dim).transpose(1, 2))
    if paired and (denominator != "negatives" or s.shape[2] > 1):
        positive = s.diagonal(dim1=1, dim2=2)
        if denominator == "negatives":
            s = s.masked_fill(torch.eye(s.shape[1], dtype=torch.bool, device=s.device), float("-inf"))
        return (s.logsumexp(dim=2) - positive).reshape(n), None

    labels, key_labels = inputs.labels, inputs.key_labels
    if options.paired:  # key i is the one positive of query i
        labels = key_labels = torch.arange(n, device=s.device)
    labels = labels.view(s.shape[0], s.shape[1])
    key_labels = key_labels.view(s.shape[0], 1, s.shape[2])
    candidate = key_labels != ignore_index
    if group_mask:
        candidate = candidate & same_group(inputs.groups, inputs.key_groups)
    if offset is not None:
        rows = torch.arange(s.shape[1], device=s.device)
        cols = torch.arange(s.shape[2], device=s.device)
        candidate = candidate & (rows[:, None] + (0 if blocks else offset) != cols)
    positive = candidate & (labels[:, :, None] == key_labels)
    negative = candidate & ~positive
    n_pos = positive.sum(dim=2)
    valid = contributing_rows(labels, n_pos, negative.sum(dim=2) if denominator == "negatives" else None,
                              denominator, ignore_index)
    if denominator == "each_positive":
        negatives = negative.any(dim=2)
        lse_negative = torch.where(negatives, _logsumexp_over(s, negative), float("-inf"))
        log_denominator = torch.logaddexp(s, lse_negative[:, :, None])
        loss = torch.where(positive, log_denominator - s, 0.0).sum(dim=2) / n_pos.clamp_min(1)
    else:
        lse = _logsumexp_over(s, candidate if denominator == "all" else negative)
        loss = lse - torch.where(positive, s, 0.0).sum(dim=2) / n_pos.clamp_min(1)
    return torch.where(valid, loss, 0.0).reshape(n), valid.reshape(n)


def _logsumexp_over(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp of each row's masked entries, for the rows that have one (the others get a finite
    value and no NaN gradient, and do not contribute). Where every entry is in the mask it is the
    very ``logsumexp`` of the paired path, so both give bit-equal losses and gradients."""
    return s.masked_fill(~mask & mask.any(dim=2, keepdim=True), float("-inf")).logsumexp(dim=2)
