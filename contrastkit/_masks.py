"""Masks, row preparation and the masked log-sum-exp: what the dense specification and the
chunked path compute alike, kept apart so that ``_reference.py`` holds only the specification."""

from __future__ import annotations

import torch

from ._options import SHARED
from ._validation import in_compute_dtype


def same_group(groups: torch.Tensor, key_groups: torch.Tensor) -> torch.Tensor:
    """(rows, cols) mask of pairs in one group; ``SHARED`` on either side matches every group."""
    return ((groups[:, None] == key_groups[None, :]) | (groups == SHARED)[:, None]
            | (key_groups == SHARED)[None, :])


# The floor of normalisation, squared: rows become x / sqrt(|x|² + 1e-24). Above a norm of ~1e-9 that
# is F.normalize's unit vector to float32 precision; below, the row shrinks smoothly to 0 instead of
# F.normalize's kink at max(|x|, 1e-12), so every backend computes one formula with no branch (a zero
# row still scales by 1e12) and the backward of the floor is no op at all.
NORM_FLOOR_SQUARED = 1e-24


def overflow_scale(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """max(1, Σ|x|) per row (keepdim, float32 or wider, without gradient): rows divided by it have
    entries of at most 1, so neither their squares nor their products can overflow; rows already
    that small divide by exactly 1."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return x.detach().abs().sum(dim=dim, keepdim=True, dtype=dtype).clamp_(1.0, torch.finfo(dtype).max)


def inverse_norm(x: torch.Tensor, dim: int = -1, wide: bool = True) -> torch.Tensor:
    """1 / sqrt(|x|² + floor²) along ``dim`` (keepdim), in x's dtype, the squares summed in float64:
    float32 squares overflow from norms of ~1e19 (the row would normalise to 0 and lose its
    gradient) and underflow below ~1e-23; float64 holds both ends of every finite float32 row, in
    fewer ops than rescaling the row first. MPS has no float64: there the row is divided by
    max(1, Σ|x|) before squaring, which keeps its sum of squares at most 1.

    ``wide=False`` sums in x's own dtype instead (the widened copy of every row is most of this
    function's time) and gives NaN, not 0, for a row whose squares overflow it, so that a result
    computed from it is not finite: only for a call whose result is tested for that and recomputed
    wide (``InfoNCEOptions.wide_norms``). Squares that underflow lie far below the floor."""
    if not wide:
        squares = x.square().sum(dim=dim, keepdim=True)
        # + squares·0 is 0 where the sum is finite and NaN where it overflowed.
        if torch.is_grad_enabled() and x.requires_grad:
            return squares.add(NORM_FLOOR_SQUARED).rsqrt().add(squares, alpha=0)
        return squares.add(NORM_FLOOR_SQUARED).rsqrt_().add_(squares, alpha=0)
    if x.device.type == "mps" and x.dtype != torch.float64:
        scale = overflow_scale(x, dim).to(x.dtype)
        return (x / scale).square().sum(dim=dim, keepdim=True).add(NORM_FLOOR_SQUARED).rsqrt() / scale
    wide = x.to(torch.float64)
    if torch.is_grad_enabled() and x.requires_grad:
        return wide.square().sum(dim=dim, keepdim=True).add(NORM_FLOOR_SQUARED).rsqrt().to(x.dtype)
    # Nothing to differentiate: the same ops in place, on the float64 copy and its sums (a fifth less time).
    if wide is x:
        wide = wide.clone()
    return wide.square_().sum(dim=dim, keepdim=True).add_(NORM_FLOOR_SQUARED).rsqrt_().to(x.dtype)


def normalized(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The library's L2 normalisation: x / sqrt(|x|² + 1e-24) along ``dim``, for rows of any finite norm."""
    return x * inverse_norm(x, dim)


def prepare(x: torch.Tensor, temperature: torch.Tensor | None, normalize: bool) -> torch.Tensor:
    """Rows in the compute dtype, L2-normalised if asked, optionally pre-scaled by 1/temperature."""
    x = in_compute_dtype(x)
    if normalize:
        x = normalized(x)
    if temperature is not None:
        x = x / temperature
    return x


def pair_masks(
    labels: torch.Tensor,
    key_labels: torch.Tensor,
    groups: torch.Tensor | None,
    key_groups: torch.Tensor | None,
    ignore_index: int,
    row_start: int = 0,
    self_offset: int | None = None,
    key_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative masks for the query rows ``row_start .. row_start + len(labels)``.

    ``key_index`` gives the key positions of the columns when they are a subset of the keys.

    A key is a candidate of a query when it is not ignored, shares the query's group (if
    groups are given; ``SHARED`` shares every group) and is not the query itself; candidates with the query's label are
    positives, the rest negatives. Whether a query itself is ignored is decided per row by
    :func:`contributing_rows`, not here.
    """
    rows, cols = labels.shape[0], key_labels.shape[0]
    candidate = (key_labels != ignore_index)[None, :]
    if groups is not None:
        candidate = candidate & same_group(groups, key_groups)
    else:
        candidate = candidate.expand(rows, cols).clone()
    if self_offset is not None:
        # Query row r is key r + row_start + self_offset: clear that one entry per row (a compare,
        # not an indexed store: selecting the rows whose key is inside would sync with the host).
        own_key = torch.arange(rows, device=labels.device) + (row_start + self_offset)
        columns = torch.arange(cols, device=labels.device) if key_index is None else key_index
        candidate &= own_key[:, None] != columns[None, :]
    positive = candidate & (labels[:, None] == key_labels[None, :])
    return positive, candidate ^ positive


def masked_logsumexp(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the masked entries of the last dimension: -inf for a row with none, with a
    finite gradient."""
    masked = torch.where(mask, s, float("-inf"))
    peak = masked.amax(dim=-1, keepdim=True).detach()
    has_any = torch.isfinite(peak)
    total = (masked - torch.where(has_any, peak, 0.0)).exp().sum(dim=-1, keepdim=True)
    # Rows with no entry: log(1) keeps the gradient finite; the result is replaced by -inf.
    lse = torch.where(has_any, total, 1.0).log() + torch.where(has_any, peak, 0.0)
    return torch.where(has_any, lse, float("-inf")).squeeze(-1)


def contributing_rows(
    labels: torch.Tensor, n_pos: torch.Tensor, n_neg: torch.Tensor | None, denominator: str, ignore_index: int
) -> torch.Tensor:
    """Queries that contribute: not ignored, with a positive and (``"negatives"``) a negative."""
    valid = (labels != ignore_index) & (n_pos > 0)
    if denominator == "negatives":
        valid = valid & (n_neg > 0)
    return valid
