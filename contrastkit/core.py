"""The one operation under every loss: a masked InfoNCE over query and key embeddings, and its
reduction. The backend that computes it is picked in ``_backends.py``."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import NamedTuple

import torch

from . import _validation as v
from ._backends import resolve_backend
from ._dense import block_count, dense_logits, takes_paired_blocks
from ._options import InfoNCEOptions, OpInputs


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    key_labels: torch.Tensor | None = None,
    groups: torch.Tensor | int | None = None,
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
            ``groups`` may instead be an int B (``key_groups`` None): the queries are B equal,
            consecutive blocks and so are the keys (B images, e.g. per-image negatives), query
            block b against key block b. The values are the same as with the ids
            ``arange(N) // (N / B)`` and ``arange(M) // (M / B)``, but the structure is known
            without reading them, so small calls take batched (B, N/B, M/B) products.
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
        backend: ``"reference"`` (dense, the specification), ``"dense"`` (dense and lean,
            batched over the blocks of an int ``groups``), ``"torch"`` (chunked, memory-lean),
            ``"triton"`` (fused kernels) or ``"auto"``: dense up to a device's crossover in
            logits, above it triton for CUDA tensors the kernels take and torch otherwise
            (``contrastkit._backends.DENSE_MAX_LOGITS``).
        self_key_offset: query i is the same embedding as key ``i + self_key_offset`` and is
            excluded from its own positives and candidates. Self-contrast sets it to 0; use it
            when the keys are the queries followed or preceded by other keys (a memory queue,
            or keys gathered from several processes).
        chunk_size: query rows per block for the torch backend (default: about 1M logits a block).

    A query contributes when its label is not ``ignore_index``, it has at least one positive,
    and, for ``denominator="negatives"``, at least one negative.

    The loss is float32 for float32/bfloat16/float16 inputs (half inputs are accumulated in
    float32) and float64 for float64 inputs. Value checks (NaN/Inf, negative labels or groups,
    a tensor τ's value, weights) need a host sync: they run where
    :func:`contrastkit.value_checks_enabled` says (by default on the CPU, not on CUDA, never
    while ``torch.compile`` traces; :func:`contrastkit.set_value_checks` switches them).
    """
    plan = _call_plan(query, key, labels, key_labels, groups, key_groups, weights, temperature, normalize,
                      denominator, ignore_index, reduction, backend, self_key_offset, chunk_size)
    n, m, options = plan.n, plan.m, plan.options
    paired, blocks = options.paired, options.blocks
    device = query.device
    if labels is not None:
        labels = labels.reshape(n).long()
    if key_labels is not None:
        key_labels = key_labels.reshape(m).long()
    if blocks is not None:
        groups = None
    elif groups is not None:
        groups = groups.reshape(n).long()
    if key_groups is not None:
        key_groups = key_groups.reshape(m).long()
    if weights is not None:
        weights = weights.reshape(n)
    if plan.self_contrast:
        key, key_labels, key_groups = query, labels, groups
    elif paired and key_groups is None:
        key_groups = groups
    tau = v.temperature_tensor(temperature, v.compute_dtype(query.dtype), device)
    chosen = resolve_backend(backend, query, plan.dim, "info_nce", plan.dense_logits, blocked=plan.blocked)

    checking = screened = v.value_checks_enabled(device)
    if checking:
        value_checks = functools.partial(v.check_values, query, key, labels, key_labels, ignore_index, groups,
                                         key_groups, temperature if isinstance(temperature, torch.Tensor) else None,
                                         weights)
        # Where the loss screens the embeddings (finite exactly when they are) it is checked once
        # computed: a test of one number instead of a pass over every embedding. Tested anyway, it
        # also lets the norms be summed in the compute dtype (no widened copy of the rows): a row
        # that overflows it makes the loss NaN, and the call is run once more with float64 sums.
        screened = plan.screened_options is not None and chosen.name == "dense"
        if screened:
            options = plan.screened_options
        else:
            value_checks()
    if paired and chosen.name != "dense":  # the dense path reads paired views from the options
        labels = key_labels = torch.arange(n, device=device)
    if blocks is not None and chosen.name != "dense":
        # Only the dense path reads the block structure; the others take it as group ids.
        groups = torch.arange(n, device=device) // (n // blocks)
        key_groups = torch.arange(m, device=device) // (m // blocks)
    inputs = OpInputs(query, key, labels, key_labels, groups, key_groups, tau)
    loss, valid = chosen.info_nce_rows(inputs, options)
    if not normalize and checking:
        v.raise_first_failure([v.logit_overflow_check(loss, query, key, tau)])
    result = reduce_rows(loss, valid, weights, reduction)
    if screened and not value_checks(screen=result):  # finite embeddings, rows too long for the compute dtype
        loss, valid = chosen.info_nce_rows(inputs, plan.options)
        result = reduce_rows(loss, valid, weights, reduction)
    return result


class _Plan(NamedTuple):
    """What the static checks of one call found: the sizes and the options."""

    n: int
    m: int
    dim: int
    self_contrast: bool
    options: InfoNCEOptions
    dense_logits: int  # how many logits the dense path forms
    blocked: bool  # ... in equal blocks
    # Where the dense path takes the paired-block function, whose loss is finite exactly when the
    # embeddings are: the options of a call whose loss is tested (norms summed in the compute dtype).
    screened_options: InfoNCEOptions | None


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 256


_SHAPE, _DTYPE, _DEVICE, _NONE = (itertools.repeat(name) for name in ("shape", "dtype", "device", None))


def _call_plan(query, key, labels, key_labels, groups, key_groups, weights, temperature, *settings) -> _Plan:
    """The call's static checks (types, shapes, dtypes, devices, settings and how they combine), run
    once for each combination of what they read and then remembered: a training loop calls a loss
    with the same shapes step after step, and at the papers' sizes re-checking them is a visible part
    of the call's time. A failing check is not remembered; under torch.compile nothing is."""
    tensors = (query, key, labels, key_labels, groups, key_groups, weights, temperature)
    if torch.compiler.is_compiling():
        return _check_call(*tensors, *settings)
    # What the checks read, built by C-level maps: of the tensor arguments their types, shapes, dtypes
    # and devices (any other object there fails its check, so is never remembered); of the numbers and
    # strings their values and types (True is not 1).
    values = (None if isinstance(groups, torch.Tensor) else groups,
              None if isinstance(temperature, torch.Tensor) else temperature, *settings)
    try:
        signature = (*map(type, tensors), *map(getattr, tensors, _SHAPE, _NONE), *map(getattr, tensors, _DTYPE, _NONE),
                     *map(getattr, tensors, _DEVICE, _NONE), *values, *map(type, values))
        plan = _PLANS.get(signature)
    except TypeError:  # an unhashable argument: checked, with its own error
        return _check_call(*tensors, *settings)
    if plan is None:
        plan = _check_call(*tensors, *settings)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[signature] = plan
    return plan


def _check_call(query, key, labels, key_labels, groups, key_groups, weights, temperature, normalize, denominator,
                ignore_index, reduction, backend, self_key_offset, chunk_size) -> _Plan:
    query_name, key_name = v.current_embedding_names()
    n, dim = v.check_embeddings(query_name, query)
    self_contrast, paired = key is None, False
    if self_contrast:
        key, m = query, n
    else:
        m, key_dim = v.check_embeddings(key_name, key)
        v.check_pair(query, key, dim, key_dim)
    device = query.device
    temperature = v.check_temperature(temperature)
    _check_settings(normalize, ignore_index, denominator, reduction, backend, chunk_size)

    labels = v.check_index_vector("labels", labels, n, device, "query")
    key_labels = v.check_index_vector("key_labels", key_labels, m, device, "key")
    blocks = None
    if isinstance(groups, int) and not isinstance(groups, bool):
        blocks = _check_blocks(groups, key_groups, n, m)
        groups = None
    else:
        groups = v.check_index_vector("groups", groups, n, device, "query")
    key_groups = v.check_index_vector("key_groups", key_groups, m, device, "key")
    v.check_weights(weights, n, device)

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
        paired = True
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

    options = InfoNCEOptions(denominator=denominator, normalize=normalize, ignore_index=ignore_index,
                             self_key_offset=self_key_offset, chunk_size=chunk_size, blocks=blocks, paired=paired)
    screened = dataclasses.replace(options, wide_norms=False) if takes_paired_blocks(options, groups is not None) \
        else None
    return _Plan(n, m, dim, self_contrast, options, dense_logits(n, m, options),
                 block_count(options, n, m) is not None, screened)


def _check_settings(normalize, ignore_index, denominator, reduction, backend, chunk_size) -> None:
    # (Runs once per remembered call plan: no memo of its own.)
    v.check_flag("normalize", normalize)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}")
    v.check_choice("denominator", denominator, v.DENOMINATORS)
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    v.check_choice("backend", backend, v.BACKENDS)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")


def _check_blocks(blocks: int, key_groups, n: int, m: int) -> int:
    if key_groups is not None:
        raise ValueError("key_groups must be None when groups is an int (the number of equal blocks of "
                         "queries and of keys)")
    if blocks < 1 or n % blocks or m % blocks:
        raise ValueError(f"groups as an int is the number of equal, consecutive blocks of queries and keys: "
                         f"it must be >= 1 and divide N={n} and M={m}; got {blocks}")
    return blocks


def reduce_rows(loss: torch.Tensor, valid: torch.Tensor | None, weights: torch.Tensor | None, reduction: str):
    """Weighted reduction of per-row losses that are already 0 where a row does not contribute
    (``valid`` None: every row contributes)."""
    if weights is not None:
        weights = weights.detach().to(loss.dtype)
        if reduction == "mean":
            # The mean is the same for weights scaled by any constant: scaled to at most 1, the
            # sums cannot overflow (float32 weights of 1e38 would give inf / inf), and weights
            # already at most 1 (confidences) are divided by exactly 1.
            weights = weights / weights.amax().clamp_min(1.0)
        loss = loss * weights
    if reduction == "none":
        return loss
    if reduction == "mean" and valid is None and weights is None:
        return loss.mean()  # every row contributes: one op
    total = loss.sum()
    if reduction == "sum":
        return total
    if valid is None:
        count = weights.sum()
    else:
        count = (valid.to(loss.dtype) if weights is None else torch.where(valid, weights, 0.0)).sum()
    # An empty batch gives exactly 0 that is still attached to the graph (total is 0 then).
    return torch.where(count > 0, total / torch.where(count > 0, count, 1.0), total)
