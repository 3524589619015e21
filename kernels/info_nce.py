"""Launchers and autograd of the fused masked InfoNCE (see ``_info_nce_kernels.py``).

The forward saves O(N + M) statistics: per query row the log-sum-exp of its denominator set,
the positive count and (``each_positive``) the sum over positives of sigmoid(lse - s_ip); per
row of either side its L2 norm. The backward turns them into two per-row weights,

    dL/ds_ij = exp(s_ij - lse_i) * a_i * [j in denominator set]  -  b_i * w_ij * [j positive]

with, for g_i the incoming gradient (0 where the row does not contribute) and |P_i| its
positive count: b_i = g_i / |P_i|; a_i = g_i for "all" and "negatives", and
a_i = b_i * sum_p sigmoid(lse_i - s_ip) for "each_positive"; w_ij = 1, or
sigmoid(lse_i - s_ij) for "each_positive" — the formulas of ``contrastkit._chunked``.
dq and dk come from two kernels, one owning query tiles and one owning key tiles, so each
output element is written once by one program: no atomics, deterministic results.

Both directions are ``torch.library`` custom ops with fake implementations, so
``torch.compile`` traces a loss built on them without a graph break.
"""

from __future__ import annotations

import torch
import triton

from .._options import SHARED, InfoNCEOptions, OpInputs, input_gradients, op_schema, split_op_args
from . import _info_nce_kernels as K
from ._layout import check_kernel_input, embedding_size, interpreting, layout, num_rows, padded_size

_INTERPRETER_BLOCKS = (32, 32, 4, 1)

# (BLOCK_N, BLOCK_M, num_warps, num_stages) by element size (2: bf16/fp16, 4: fp32), kernel and
# largest padded D. Measured on an H100 with benchmarks/tune_blocks.py (N = M = 32,768; see
# benchmarks/results/nvidia-h100-2026-11-23-kernels.md): 2-byte D <= 256 and 4-byte D = 128.
# The rest are estimates that fit Hopper's shared memory; _launch shrinks any that do not fit
# a smaller GPU.
GPU_BLOCKS = {
    2: {
        "forward": {64: (128, 32, 4, 3), 128: (128, 32, 4, 3), 256: (64, 32, 4, 2), 512: (32, 32, 4, 1),
                    1024: (16, 16, 4, 1)},
        "backward_query": {64: (32, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 64, 4, 2), 512: (16, 16, 4, 1),
                           1024: (16, 16, 4, 1)},
        "backward_key": {64: (64, 64, 4, 3), 128: (64, 64, 4, 2), 256: (64, 32, 4, 2), 512: (16, 16, 4, 1),
                         1024: (16, 16, 4, 1)},
    },
    4: {  # float32 takes D <= 512 (_layout.MAX_EMBEDDING_SIZE)
        "forward": {64: (128, 64, 8, 2), 128: (128, 64, 8, 2), 256: (64, 32, 4, 2), 512: (32, 32, 4, 1)},
        "backward_query": {64: (32, 64, 4, 2), 128: (32, 64, 4, 2), 256: (32, 32, 4, 1), 512: (16, 16, 4, 1)},
        "backward_key": {64: (64, 32, 4, 2), 128: (64, 32, 4, 2), 256: (32, 32, 4, 1), 512: (16, 16, 4, 1)},
    },
}
# (kind, element size, D bound) -> the shape that replaced a tuned one this process's GPU could not fit.
_SHRUNK: dict[tuple, tuple[int, int, int, int]] = {}


def _shape_key(kind: str, d_pad: int, element_size: int) -> tuple:
    table = GPU_BLOCKS[element_size][kind]
    return kind, element_size, min(bound for bound in table if bound >= d_pad)


def _blocks(kind: str, d_pad: int, element_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_M, num_warps, num_stages) of one kernel for rows padded to d_pad."""
    if interpreting():
        # Bigger numpy tiles are faster under the interpreter; 32 still leaves ragged edges.
        return _INTERPRETER_BLOCKS
    key = _shape_key(kind, d_pad, element_size)
    return _SHRUNK.get(key, GPU_BLOCKS[element_size][kind][key[2]])


def smaller_blocks(block: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    """The next shape to try when ``block`` needs more shared memory than the GPU has:
    one pipeline stage fewer, then the larger tile side halved (16 is tl.dot's minimum)."""
    block_n, block_m, warps, stages = block
    if stages > 1:
        return block_n, block_m, warps, stages - 1
    if max(block_n, block_m) <= 16:
        return None
    if block_n >= block_m:
        return block_n // 2, block_m, warps, 2
    return block_n, block_m // 2, warps, 2


def _launch(kernel, kind: str, d_pad: int, element_size: int, grid_rows: int, by_query_tiles: bool, args_for,
            flags):
    """Launch ``kernel`` with its tuned shape, shrinking it while the GPU lacks shared memory.

    ``args_for(block_n, block_m)`` gives the kernel's arguments for a shape (tile bounds depend on it).
    """
    from triton.runtime.errors import OutOfResources

    block = _blocks(kind, d_pad, element_size)
    while True:
        block_n, block_m, warps, stages = block
        grid = (triton.cdiv(grid_rows, block_n if by_query_tiles else block_m),)
        try:
            kernel[grid](*args_for(block_n, block_m), **flags, BLOCK_N=block_n, BLOCK_M=block_m, D_PAD=d_pad,
                         num_warps=warps, num_stages=stages)
            return
        except OutOfResources:
            block = smaller_blocks(block)
            if block is None:
                raise
            _SHRUNK[_shape_key(kind, d_pad, element_size)] = block


def tile_group_bounds(groups: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest group id of each run of ``block`` consecutive rows (the last run may be
    short); a run holding a ``SHARED`` row meets every group.

    The kernels skip a pair of tiles whose group ranges do not meet: no pair in it is a candidate.
    """
    pad = (-groups.numel()) % block
    padded = torch.cat([groups, groups[-1:].expand(pad)]) if pad else groups
    tiles = padded.view(-1, block)
    shared = (tiles == SHARED).any(1)
    lo = torch.where(shared, torch.iinfo(torch.int64).min + 1, tiles.amin(1))
    hi = torch.where(shared, torch.iinfo(torch.int64).max, tiles.amax(1))
    return lo, hi


def _tile_bounds(groups, block, dummy):
    return (dummy, dummy) if groups is None else tile_group_bounds(groups, block)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 products follow torch's matmul setting. Without TF32 they use three TF32 products
    # (about float32's accuracy) rather than "ieee", which runs on the CUDA cores and measured
    # about 100x slower than bf16 on an H100.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of every embedding row of x, in float32, read in place."""
    n, d = num_rows(x), embedding_size(x)
    d_pad = padded_size(d)
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    block = max(1, 4096 // d_pad)
    K.row_norm_kernel[(triton.cdiv(n, block),)](x, out, n, d, *layout(x), BLOCK=block, D_PAD=d_pad)
    return out


def _common_args(inputs: OpInputs, q_norm, k_norm):
    dummy = inputs.labels  # never read when the matching constexpr flag is off
    return (inputs.query, inputs.key, q_norm, k_norm, inputs.labels, inputs.key_labels,
            dummy if inputs.groups is None else inputs.groups,
            dummy if inputs.key_groups is None else inputs.key_groups)


def _sizes(inputs: OpInputs, options: InfoNCEOptions, tau):
    n, m, d = num_rows(inputs.query), num_rows(inputs.key), embedding_size(inputs.query)
    return (n, m, d, options.self_key_offset or 0, options.ignore_index, tau,
            *layout(inputs.query), *layout(inputs.key))


def _flags(inputs: OpInputs, options: InfoNCEOptions):
    query = inputs.query
    return dict(DENOM=K.DENOMINATOR_CODES[options.denominator], NORMALIZE=options.normalize,
                HAS_GROUPS=inputs.groups is not None, HAS_SELF=options.self_key_offset is not None,
                DOT_PRECISION=_dot_precision(query.dtype), UPCAST=interpreting() and query.dtype == torch.bfloat16)


def _kernel_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """τ as the one float32 element the kernels read (no host synchronisation)."""
    return temperature.detach().to(torch.float32).reshape(1)


def _forward(*args):
    """(loss, valid, lse, positive count, sum_p sigmoid(lse - s_ip), query norms, key norms)."""
    _, inputs, _, options = split_op_args(args)
    query, key = inputs.query, inputs.key
    n, m, d = num_rows(query), num_rows(key), embedding_size(query)
    f32 = dict(dtype=torch.float32, device=query.device)
    q_norm = row_norms(query) if options.normalize else torch.ones(n, **f32)
    k_norm = row_norms(key) if options.normalize else torch.ones(m, **f32)
    loss, lse, pos_sigmoid = torch.empty(n, **f32), torch.empty(n, **f32), torch.zeros(n, **f32)
    valid = torch.empty(n, dtype=torch.bool, device=query.device)
    n_pos = torch.empty(n, dtype=torch.int32, device=query.device)
    common = _common_args(inputs, q_norm, k_norm)
    rest = (loss, valid.view(torch.int8), lse, n_pos, pos_sigmoid,
            *_sizes(inputs, options, _kernel_temperature(inputs.temperature)))
    _launch(K.info_nce_fwd_kernel, "forward", padded_size(d), query.element_size(), n, True,
            lambda block_n, block_m: (*common, *_tile_bounds(inputs.key_groups, block_m, inputs.labels), *rest),
            _flags(inputs, options))
    return loss, valid, lse, n_pos, pos_sigmoid, q_norm, k_norm


def _forward_fake(*args):
    _, inputs, _, _ = split_op_args(args)
    n, m = num_rows(inputs.query), num_rows(inputs.key)
    query = inputs.query
    rows = [query.new_empty(n, dtype=torch.float32) for _ in range(3)]
    return (rows[0], query.new_empty(n, dtype=torch.bool), rows[1], query.new_empty(n, dtype=torch.int32),
            rows[2], query.new_empty(n, dtype=torch.float32), query.new_empty(m, dtype=torch.float32))


forward_op = torch.library.custom_op("contrastkit::info_nce_rows_triton", _forward, mutates_args=(),
                                     schema=op_schema(returns="(" + ", ".join(["Tensor"] * 7) + ")"))
forward_op.register_fake(_forward_fake)

_SAVED = "Tensor valid, Tensor lse, Tensor n_pos, Tensor pos_sigmoid, Tensor q_norm, Tensor k_norm"


def _backward(*args):
    """(grad query, grad key, grad temperature).

    The temperature's gradient is -(1/tau) sum_ij dL/ds_ij s_ij; one of the two kernels adds up
    sum_j dL/ds_ij s_ij per row in its epilogue from its accumulator (dq's when it runs).
    """
    (grad_loss,), inputs, after, options = split_op_args(args, 1)
    valid, lse, n_pos, pos_sigmoid, q_norm, k_norm, need_query, need_key, need_temperature = after
    query, key = inputs.query, inputs.key
    n, m, d = num_rows(query), num_rows(key), embedding_size(query)
    grad_row = torch.where(valid, grad_loss.to(torch.float32), 0.0)
    pos_weight = grad_row / n_pos.clamp_min(1)
    exp_weight = pos_weight * pos_sigmoid if options.denominator == "each_positive" else grad_row
    # +inf makes exp(s - lse) vanish on rows that do not contribute, whatever their logits.
    lse = torch.where(valid, lse, float("inf"))
    tau = _kernel_temperature(inputs.temperature)
    common = _common_args(inputs, q_norm, k_norm)
    sizes = _sizes(inputs, options, tau)
    flags = _flags(inputs, options)
    d_pad, element_size = padded_size(d), query.element_size()
    run_query = need_query or (need_temperature and not need_key)
    grad_query = torch.empty_like(query) if run_query else torch.zeros_like(query)
    grad_key = torch.empty_like(key) if need_key else torch.zeros_like(key)
    tau_rows = torch.zeros(n if run_query else m, dtype=torch.float32, device=query.device)
    weights = (lse, exp_weight, pos_weight)
    if run_query:  # query tiles visit the key tiles whose groups meet theirs
        _launch(K.info_nce_bwd_query_kernel, "backward_query", d_pad, element_size, n, True,
                lambda block_n, block_m: (*common, *_tile_bounds(inputs.key_groups, block_m, inputs.labels),
                                          *weights, grad_query, tau_rows, *sizes, *layout(grad_query)[2:]),
                {**flags, "TAU_GRAD": need_temperature})
    if need_key:  # and key tiles the query tiles
        _launch(K.info_nce_bwd_key_kernel, "backward_key", d_pad, element_size, m, False,
                lambda block_n, block_m: (*common, *_tile_bounds(inputs.groups, block_n, inputs.labels),
                                          *weights, grad_key, tau_rows, *sizes, *layout(grad_key)[2:]),
                {**flags, "TAU_GRAD": need_temperature and not run_query})
    temperature = inputs.temperature
    grad_temperature = (-tau_rows.sum() / tau[0]).to(temperature.dtype).reshape(temperature.shape)
    return grad_query, grad_key, grad_temperature


def _backward_fake(*args):
    _, inputs, _, _ = split_op_args(args, 1)
    return torch.empty_like(inputs.query), torch.empty_like(inputs.key), torch.empty_like(inputs.temperature)


backward_op = torch.library.custom_op(
    "contrastkit::info_nce_rows_triton_backward", _backward, mutates_args=(),
    schema=op_schema("Tensor grad_loss", _SAVED + ", bool need_query, bool need_key, bool need_temperature",
                     "(Tensor, Tensor, Tensor)"))
backward_op.register_fake(_backward_fake)


def _setup_context(ctx, inputs, output):
    _, valid, lse, n_pos, pos_sigmoid, q_norm, k_norm = output
    ctx.save_for_backward(*inputs[:-1], valid, lse, n_pos, pos_sigmoid, q_norm, k_norm)
    ctx.options = inputs[-1]


def _autograd_backward(ctx, grad_loss, *_unused_grads):
    need = dict(zip(OpInputs._fields, ctx.needs_input_grad, strict=False))
    grad_query, grad_key, grad_temperature = backward_op(
        grad_loss, *ctx.saved_tensors, need["query"], need["key"], need["temperature"], ctx.options)
    return input_gradients(query=grad_query if need["query"] else None, key=grad_key if need["key"] else None,
                           temperature=grad_temperature if need["temperature"] else None)


forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got a {x.device.type} tensor); set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels on the CPU, or use backend='torch'"
        )


def info_nce_rows(inputs: OpInputs, options: InfoNCEOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row masked InfoNCE (float32, 0 where a row does not contribute) and the contributing mask.

    query and key are (N, D) / (M, D) rows or (B, C, H, W) maps, read in place through their
    strides; in self-contrast key is query. Differentiable w.r.t. query, key and a tensor temperature.
    """
    for name, x in (("query", inputs.query), ("key", inputs.key)):
        check_kernel_input(name, x)
        _check_device(x)
    # O(N) id vectors are made contiguous (groups int64, as the kernels compare them); the
    # embeddings are never copied.
    inputs = inputs._replace(
        labels=inputs.labels.contiguous(), key_labels=inputs.key_labels.contiguous(),
        groups=None if inputs.groups is None else inputs.groups.to(torch.int64).contiguous(),
        key_groups=None if inputs.key_groups is None else inputs.key_groups.to(torch.int64).contiguous())
    loss, valid, *_ = forward_op(*inputs, options.encode())
    return loss, valid
