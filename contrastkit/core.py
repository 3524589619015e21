"""The one operation under every loss: a masked InfoNCE over query and key embeddings, and
the one place that picks the backend of every fused operation (``info_nce``, ``pool_patches``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import reduce

from . import _validation as v
from ._chunked import chunked_rows
from ._options import InfoNCEOptions, OpInputs
from ._reference import dense_rows


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    key_labels: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.1,
    normalize: bool = True,
    denominator: str = "all",
    weights: torch.Tensor | None = None,
    ignore_index: int = -1,
    reduction: str = "mean",
    backend: str = "auto",
    self_key_offset: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Masked InfoNCE of queries against keys.

    With :math:`s_{ij} = \langle q_i, k_j \rangle / \tau` (rows L2-normalised when
    ``normalize``), positives :math:`P_i` and candidates :math:`C_i` of query *i*,

    .. math::
        \ell_i = -\frac{1}{|P_i|} \sum_{p \in P_i}
                 \Big( s_{ip} - \log \sum_{a \in A_i(p)} e^{s_{ia}} \Big)

    where :math:`A_i(p)` is ``C_i`` (``denominator="all"``), ``{p} ∪ (C_i \ P_i)``
    (``"each_positive"``) or ``C_i \ P_i`` (``"negatives"``).

    Args:
        query: (N, D) embeddings, or a (B, C, H, W) feature map read as B·H·W rows of size C.
        key: (M, D) embeddings or a feature map; ``None`` for self-contrast (the keys are the
            queries and a query is never its own positive or candidate).
        labels: (N,) integer class ids. Positives of query i are the keys with
            ``key_labels[j] == labels[i]``. ``None`` with a ``key`` means paired views: N must
            equal M and key i is the one positive of query i.
        key_labels: (M,) class ids of the keys; defaults to ``labels`` in self-contrast.
        groups, key_groups: (N,) and (M,) non-negative integer ids; a key is a candidate of a
            query only when their groups are equal. :data:`contrastkit.SHARED` (-1) on either side
            matches every group: mark keys shared by all images (a memory queue's) this way.
            ``key_groups`` defaults to ``groups`` in self-contrast and for paired views.
        temperature: τ > 0, a number or a 0-dim floating tensor on the query's device; gradients
            flow to a tensor τ on every backend (e.g. ``log_tau.exp()`` for a learnable τ).
        normalize: L2-normalise rows first, so that similarities are cosines.
        denominator: ``"all"``, ``"each_positive"`` or ``"negatives"`` (see above).
        weights: (N,) non-negative per-anchor weights, e.g. pseudo-label confidence. They are
            treated as constants (no gradient flows into them).
        ignore_index: a query or key with this label takes no part at all.
        reduction: ``"mean"`` — weighted mean over contributing anchors; **exactly 0, still
            attached to the graph, when no anchor contributes**; ``"sum"``; ``"none"`` — the
            weighted per-query loss, 0 where a query does not contribute.
        backend: ``"reference"`` (dense, the specification), ``"torch"`` (chunked,
            memory-lean), ``"triton"`` (fused kernels) or ``"auto"`` (triton for CUDA tensors
            when available, torch otherwise).
        self_key_offset: query i is the same embedding as key ``i + self_key_offset`` and is
            excluded from its own positives and candidates. Self-contrast sets it to 0; use it
            when the keys are the queries followed or preceded by other keys (a memory queue,
            or keys gathered from several processes).
        chunk_size: query rows per block for the torch backend (default: about 1M logits a block).

    A query contributes when its label is not ``ignore_index``, it has at least one positive,
    and, for ``denominator="negatives"``, at least one negative.

    The loss is float32 for float32/bfloat16/float16 inputs (half inputs are accumulated in
    float32) and float64 for float64 inputs. Value checks (NaN/Inf, negative labels or groups,
    a tensor τ's value) are skipped while ``torch.compile`` traces the call.
    """
    n, dim = v.check_embeddings("query", query)
    self_contrast = key is None
    if self_contrast:
        key, m = query, n
    else:
        m, key_dim = v.check_embeddings("key", key)
        v.check_pair(query, key, dim, key_dim)
    device = query.device
    temperature = v.check_temperature(temperature)
    v.check_flag("normalize", normalize)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}")
    v.check_choice("denominator", denominator, v.DENOMINATORS)
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    v.check_choice("backend", backend, v.BACKENDS)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")

    labels = v.check_index_vector("labels", labels, n, device, "query")
    key_labels = v.check_index_vector("key_labels", key_labels, m, device, "key")
    groups = v.check_index_vector("groups", groups, n, device, "query")
    key_groups = v.check_index_vector("key_groups", key_groups, m, device, "key")
    weights = v.check_weights(weights, n, device)

    if self_contrast:
        if labels is None:
            raise ValueError("labels is required for self-contrast (key=None): they define the positives")
        if key_labels is not None:
            raise ValueError("key_labels must be None for self-contrast (key=None): the keys are the queries")
        if key_groups is not None:
            raise ValueError("key_groups must be None for self-contrast (key=None): the keys are the queries")
        key_labels, key_groups = labels, groups
        if self_key_offset is None:
            self_key_offset = 0
    elif labels is None:
        if key_labels is not None:
            raise ValueError("key_labels needs labels: without labels, query i and key i are paired views")
        if n != m:
            raise ValueError(f"paired views (labels=None) need as many keys as queries; got N={n}, M={m}")
        labels = key_labels = torch.arange(n, device=device)
        if key_groups is None:
            key_groups = groups
    elif key_labels is None:
        raise ValueError("key_labels is required when labels and key are given")
    if (groups is None) != (key_groups is None):
        raise ValueError("groups and key_groups must be given together (key_groups defaults to groups "
                         "only in self-contrast and for paired views)")
    if self_key_offset is not None:
        if isinstance(self_key_offset, bool) or not isinstance(self_key_offset, int):
            raise TypeError(f"self_key_offset must be an int or None; got {type(self_key_offset).__name__}")
        if not 0 <= self_key_offset <= m - n:
            raise ValueError(f"self_key_offset must lie in [0, M - N] = [0, {m - n}]; got {self_key_offset}")
    tau = v.temperature_tensor(temperature, v.compute_dtype(query.dtype), device)

    if not torch.compiler.is_compiling():
        v.check_values(query, key, labels, key_labels, ignore_index, groups, key_groups,
                       tau if isinstance(temperature, torch.Tensor) else None)
        if weights is not None:
            v.check_weight_values(weights)

    options = InfoNCEOptions(denominator=denominator, normalize=normalize, ignore_index=ignore_index,
                             self_key_offset=self_key_offset, chunk_size=chunk_size)
    inputs = OpInputs(query, key, labels, key_labels, groups, key_groups, tau)
    loss, valid = resolve_backend(backend, query, dim, "info_nce").info_nce_rows(inputs, options)
    return reduce_rows(loss, valid, weights, reduction)


def reduce_rows(loss: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor | None, reduction: str):
    """Weighted reduction of per-row losses that are already 0 where a row does not contribute."""
    if weights is not None:
        weights = weights.detach().to(loss.dtype)
        loss = loss * weights
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    count = valid.to(loss.dtype) if weights is None else torch.where(valid, weights, 0.0)
    count = count.sum()
    # An empty batch gives exactly 0 that is still attached to the graph (total is 0 then).
    return torch.where(count > 0, total / torch.where(count > 0, count, 1.0), total)


# ----------------------------------------------------------------------------- backends


class Backend(NamedTuple):
    """One implementation of every fused operation, and what it takes."""

    name: str
    supports: Callable[[str, torch.Tensor, int], bool]  # (operation, input, embedding size or channels)
    info_nce_rows: Callable[[OpInputs, InfoNCEOptions], tuple[torch.Tensor, torch.Tensor]]
    pool_patches: Callable[[torch.Tensor, int, int, bool], torch.Tensor]


def _mean_pool(features: torch.Tensor, grid_h: int, grid_w: int, normalize: bool) -> torch.Tensor:
    pooled = reduce(features, "b c (gh ph) (gw pw) -> b c gh gw", "mean", gh=grid_h, gw=grid_w)
    return F.normalize(pooled, dim=1) if normalize else pooled


def _any_input(operation: str, x: torch.Tensor, size: int) -> bool:
    return True


def _triton_supports(operation: str, x: torch.Tensor, size: int) -> bool:
    """Kernels available for this device, dtype and size: float64 and over-long rows stay on torch."""
    from . import kernels

    if x.device.type != "cuda" or not kernels.available():
        return False
    return kernels.supports(x.dtype, size) if operation == "info_nce" else x.dtype in kernels.KERNEL_DTYPES


def _triton(operation: str):
    def run(*args):
        from . import kernels

        reason = kernels.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
        return getattr(kernels, operation)(*args)

    return run


BACKEND_TABLE = {
    "reference": Backend("reference", _any_input, dense_rows, _mean_pool),
    "torch": Backend("torch", _any_input, chunked_rows, _mean_pool),
    "triton": Backend("triton", _triton_supports, _triton("info_nce_rows"), _triton("pool_patches")),
}


def resolve_backend(backend: str, x: torch.Tensor, size: int, operation: str) -> Backend:
    """The backend that runs ``operation`` on ``x``: the named one, or for ``"auto"`` the Triton
    kernels when they take ``x`` (CUDA, a kernel dtype, a supported size) and torch otherwise.

    A backend named explicitly runs even where ``auto`` would not pick it, so its own errors
    (e.g. the kernels' refusal of float64) reach the caller.
    """
    v.check_choice("backend", backend, v.BACKENDS)
    if backend == "auto":
        triton = BACKEND_TABLE["triton"]
        return triton if triton.supports(operation, x, size) else BACKEND_TABLE["torch"]
    return BACKEND_TABLE[backend]
