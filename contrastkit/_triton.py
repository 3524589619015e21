"""The Triton backend: contrastkit's side of the kernels in ``kernels/`` (``contrastkit.kernels``).

``kernels/`` is a layer below the library: it takes tensors and flags and knows nothing of
contrastkit. This module adapts the core op's :class:`~contrastkit._options.OpInputs` and
:class:`~contrastkit._options.InfoNCEOptions` to it, and says which inputs the kernels take.
"""

from __future__ import annotations

import torch

from ._masks import overflow_scale
from ._options import InfoNCEOptions, OpInputs


def supports(operation: str, x: torch.Tensor, size: int) -> bool:
    """Kernels available for this device, dtype and size: float64 and over-long rows stay on torch."""
    from . import kernels

    if x.device.type != "cuda" or not kernels.available():
        return False
    return kernels.supports(x.dtype, size) if operation == "info_nce" else x.dtype in kernels.KERNEL_DTYPES


def _require_kernels():
    from . import kernels

    reason = kernels.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot run: {reason}")
    return kernels


# Options the kernels do not read: the torch backend's chunk size, and the dense path's block
# structure (the core op has turned int groups into group ids by the time the kernels run), paired
# views (their labels are ids by then) and the width of its paired blocks' norms (the kernels scale
# each row against overflow instead, below).
NOT_FOR_KERNELS = ("chunk_size", "blocks", "paired", "wide_norms")


def _overflow_safe_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by a power of two at least max(1, Σ|x|) (rows whose entries sum to at most 1 in
    magnitude unchanged, see ``_masks.overflow_scale``): the kernels multiply raw rows and scale the
    products by the inverse norms, so rows of norm ~1e19 and more would overflow the products. A
    power of two divides exactly, in bf16 too, so the kernels see the input's values; fp16 (at most
    65504) cannot overflow them."""
    if x.dtype == torch.float16:
        return x
    return x / torch.exp2(torch.ceil(torch.log2(overflow_scale(x, dim=1)))).to(x.dtype)


def info_nce_rows(inputs: OpInputs, options: InfoNCEOptions) -> tuple[torch.Tensor, torch.Tensor]:
    if options.normalize:
        query = _overflow_safe_rows(inputs.query)
        key = query if inputs.key is inputs.query else _overflow_safe_rows(inputs.key)
        inputs = inputs._replace(query=query, key=key)
    # OpInputs lists the tensors in the kernels' order.
    return _require_kernels().info_nce_rows(*inputs, denominator=options.denominator, normalize=options.normalize,
                                            ignore_index=options.ignore_index,
                                            self_key_offset=options.self_key_offset)


def pool_patches(features: torch.Tensor, grid_h: int, grid_w: int, normalize: bool) -> torch.Tensor:
    return _require_kernels().pool_patches(features, grid_h, grid_w, normalize)
