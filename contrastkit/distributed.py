"""Gathering keys across processes for contrastive losses under DistributedDataParallel.

Every loss in contrastkit that takes ``gather_distributed=True`` goes through :func:`gather_keys`:
queries stay local, keys (with their labels and groups) become the global batch, and each
rank computes the loss of its own anchors against all keys. ``self_offset`` is where this
rank's rows start inside the gathered keys, which is what ``info_nce(self_key_offset=...)``
needs to keep a query from contrasting with itself.

Gradient convention: the gradient of the gathered keys is summed over ranks and routed
back to the rank that produced them. So on rank r the gradient of its inputs is the
gradient of ``sum over ranks of their losses``; DDP then averages parameter gradients over
ranks, which gives the gradient of the mean of the per-rank losses. When every rank has
the same number of contributing anchors, that is the gradient of the mean loss over the
global batch.

Ranks may hold different numbers of rows: sizes are exchanged first and rows are padded for
the collective. Every rank must call these functions in the same order with tensors of the
same trailing shape and dtype (they are collectives). Without an initialised process group
everything falls back to a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_sizes(n: int, device: torch.device) -> list[int]:
    """The number of rows every rank holds, in rank order (``[n]`` in a single process)."""
    if not is_distributed():
        return [n]
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def rank_offset(n: int, device: torch.device) -> int:
    """How many rows the ranks before this one hold (0 in a single process)."""
    return sum(all_sizes(n, device)[: get_rank()])


def _all_gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenation over ranks of their ``x`` along dim 0, padding to the largest rank."""
    x = x.contiguous()
    longest = max(sizes)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


class _GatherWithGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes):
        ctx.start = sum(sizes[: get_rank()])
        ctx.stop = ctx.start + x.shape[0]
        return _all_gather_rows(x, list(sizes))

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss may depend on our rows: sum their gradients, keep our slice.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop], None


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)
_TRAILING = 4  # trailing dimensions described per tensor (rows are (n, D) or (n,) in practice)


def _layout(x: torch.Tensor | None) -> list[int]:
    if x is None:
        return [0] * (3 + _TRAILING)
    trailing = list(x.shape[1:])[:_TRAILING]
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)
    return [1, code, x.dim(), *trailing, *[0] * (_TRAILING - len(trailing))]


def _describe(row: list[int]) -> str:
    if not row[0]:
        return "None"
    dtype = _DTYPES[row[1]] if row[1] < len(_DTYPES) else "another dtype"
    return f"{dtype} with {row[2]} dims, trailing shape {tuple(row[3:3 + max(row[2] - 1, 0)])}"


def _agreed_sizes(keys: torch.Tensor, index_tensors) -> list[int]:
    """Every rank's row count, from one all-gather that also carries each tensor's dtype and
    trailing shape. Ranks that disagree (another embedding size, a float16 rank beside float32
    ones) would make the row gather fail inside the backend — gloo aborts the process — so every
    rank compares the layouts it received and raises the same clear error instead."""
    tensors = (keys, *index_tensors)
    mine = [keys.shape[0]] + [value for x in tensors for value in _layout(x)]
    local = torch.tensor(mine, dtype=torch.long, device=keys.device)
    parts = [torch.empty_like(local) for _ in range(get_world_size())]
    dist.all_gather(parts, local)
    rows = [part.tolist() for part in parts]
    width = 3 + _TRAILING
    for position in range(len(tensors)):
        field = slice(1 + position * width, 1 + (position + 1) * width)
        layouts = [row[field] for row in rows]
        if any(layout != layouts[0] for layout in layouts):
            name = "keys" if position == 0 else f"index tensor {position - 1}"
            seen = "; ".join(f"rank {rank}: {_describe(layout)}" for rank, layout in enumerate(layouts))
            raise ValueError(f"the ranks disagree on the {name} they gather (every rank must pass the same "
                             f"dtype and trailing shape): {seen}")
    return [row[0] for row in rows]


def gather_keys(keys: torch.Tensor, *index_tensors: torch.Tensor | None):
    """All-gather ``keys`` and matching per-row tensors (labels, groups, ...) over ranks.

    Args:
        keys: (n, ...) rows of this rank; gradients flow back to the rank that produced them.
        index_tensors: tensors (or ``None``, passed through) with one entry per row of
            ``keys`` along dim 0, gathered without gradient.

    Returns:
        ``(all_keys, *all_index_tensors, self_offset)``: rows of rank 0 first, then rank 1,
        ...; ``self_offset`` is the position of this rank's first row in ``all_keys``.
        Without an initialised process group (or with one process) the inputs come back
        unchanged with ``self_offset = 0``.
    """
    if not isinstance(keys, torch.Tensor) or keys.dim() < 1:
        raise TypeError(f"keys must be a torch.Tensor with at least one dimension; got {keys!r:.80}")
    n = keys.shape[0]
    for position, x in enumerate(index_tensors):
        if x is not None and (not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != n):
            raise ValueError(
                f"index tensor {position} must be a tensor with one entry per key row ({n}) along dim 0"
            )
    if not is_distributed():
        return (keys, *index_tensors, 0)
    sizes = _agreed_sizes(keys, index_tensors)
    if keys.requires_grad:
        all_keys = _GatherWithGradient.apply(keys, tuple(sizes))
    else:
        all_keys = _all_gather_rows(keys, sizes)
    gathered = [None if x is None else _all_gather_rows(x.detach(), sizes) for x in index_tensors]
    return (all_keys, *gathered, sum(sizes[: get_rank()]))


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        total = x.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on the sum, hence on our x: sum their gradients.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``x`` over ranks, on every rank; ``x`` itself in a single process.

    Differentiable with the convention of :func:`gather_keys`: the gradient reaching ``x`` on
    a rank is that of the sum of all ranks' losses, so DDP's gradient averaging yields the
    gradient of their mean. Use it for batch-level statistics such as a soft Dice's
    intersection and union over the global batch. A collective: every rank must call it with
    a tensor of the same shape and dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if not is_distributed():
        return x
    if x.requires_grad:
        return _SumOverRanks.apply(x)
    total = x.detach().contiguous().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
