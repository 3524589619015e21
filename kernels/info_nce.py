"""Launchers and autograd of the fused masked InfoNCE (see ``_info_nce_kernels.py`` and ``_plan.py``).

The forward sorts both sides by (group, label) (``_plan.sort_keys``: one or two torch sorts a side),
makes the plan in a few launches (``_plan_kernels``: ids, counts and chunk statistics per side, then
per tile kernel the other side's tiles to visit, clean first, then positive, then masked), gathers
each side once into a contiguous, padded (rows, D_PAD) copy with its rows' inverse norms and runs
the tile loops. It returns, for the backward, O(N) statistics in sorted order (per query row the
log2-sum-exp of its denominator set and, for ``each_positive``, the sum over positives of
sigmoid(lse - s_ip)) and the plan of each side (order, ids, counts, contributing flags, chunk
statistics: one int32 tensor a side). The backward gathers the copies again (O((N + M) D), with the
maxima its prescales need), turns the statistics into per-row weights in one launch, lists its own
tiles and runs its kernels; the whole call issues a handful of torch ops beside its launches and
never waits for the device. The weights:

    dL/ds_ij = a_i · exp(s_ij - lse_i) · [j in denominator set]  -  b_i · w_ij · [j positive]

with, for g_i the incoming gradient (0 where the row does not contribute) and |P_i| its positive
count: b_i = g_i / |P_i|; a_i = g_i for "all" and "negatives", and a_i = b_i · Σ_p sigmoid(lse_i - s_ip)
for "each_positive"; w_ij = 1, or sigmoid(lse_i - s_ij) for "each_positive" — the formulas of
``contrastkit._chunked``. Queries and keys: dq and dk come from two kernels, one owning query tiles
and one owning key tiles. Self-contrast (the keys are the queries, own key excluded): one kernel
owns row tiles and adds both directions from each logit tile, since s is symmetric. Every output
element is written once by one program: no atomics, deterministic results.

Low-precision operands of the second product never carry a tiny row weight times a tiny
probability (fp16 would flush it to zero at large N): dq applies g_i after the product, and dk and
the symmetric kernel prescale their weights by a power of two that brings the largest to ~2^13.

Both directions are ``torch.library`` custom ops with fake implementations, so ``torch.compile``
traces a loss built on them without a graph break. Their arguments are the call's tensors
(:class:`Inputs`) and its static settings (:class:`Settings`), in that order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _info_nce_kernels as K
from . import _plan as P
from . import _plan_kernels as PK
from ._layout import check_kernel_input, embedding_size, interpreting, layout, num_rows, padded_size


class Inputs(NamedTuple):
    """The tensors of one call, in the order the ops take them."""

    query: torch.Tensor  # (N, D) rows or a (B, C, H, W) map
    key: torch.Tensor  # (M, D) rows or a map; the query tensor itself in self-contrast
    labels: torch.Tensor  # (N,) integer ids
    key_labels: torch.Tensor  # (M,) integer ids
    groups: torch.Tensor | None  # (N,) integer ids, _plan.SHARED_GROUP meeting every group; or None
    key_groups: torch.Tensor | None  # (M,) likewise; None exactly when groups is
    temperature: torch.Tensor  # 0-dim; may require grad


class Settings(NamedTuple):
    """The static settings of one call, in the order the ops take them."""

    denominator: str  # a key of _info_nce_kernels.DENOMINATOR_CODES
    normalize: bool  # L2-normalise the rows before the products
    ignore_index: int  # a label that takes no part: such a query has no loss, such a key is no candidate
    self_key_offset: int | None  # query i's own key is key i + offset, never its candidate; None: no own key


_INPUTS_SCHEMA = ("Tensor query, Tensor key, Tensor labels, Tensor key_labels, Tensor? groups, Tensor? key_groups, "
                  "Tensor temperature")
_SETTINGS_SCHEMA = "str denominator, bool normalize, int ignore_index, int? self_key_offset"


def _schema(returns: str, before: str = "", after: str = "") -> str:
    """An op's schema: ``before`` arguments, the inputs, ``after`` arguments, the settings."""
    args = ", ".join(part for part in (before, _INPUTS_SCHEMA, after, _SETTINGS_SCHEMA) if part)
    return f"({args}) -> {returns}"


def _split(args: tuple, before: int = 0) -> tuple[tuple, Inputs, tuple, Settings]:
    """An op's positional arguments as (before, inputs, after, settings)."""
    start, end = before + len(Inputs._fields), len(args) - len(Settings._fields)
    return args[:before], Inputs(*args[before:start]), args[start:end], Settings(*args[end:])


def _input_gradients(**gradients: torch.Tensor | None) -> tuple:
    """An op's backward result: one entry per input by name (None where not given), None per setting."""
    return (*(gradients.get(name) for name in Inputs._fields), *(None for _ in Settings._fields))


KINDS = ("forward", "forward_positive", "backward_query", "backward_key", "backward_symmetric")
_INTERPRETER_BLOCKS = (32, 32, 4, 1)

# (BLOCK_N, BLOCK_M, num_warps, num_stages) by element size (2: bf16/fp16, 4: fp32), kernel and
# largest padded D; BLOCK_N counts queries (the symmetric kernel's rows), BLOCK_M keys (its columns).
# The bf16 D = 128 shapes keep the hot loops within their instruction budget without spills
# (benchmarks/sass_budget.py); the rest fit Hopper's shared memory (tests/kernels/compile_for_gpu.py
# --table) and wait for a GPU to be timed (benchmarks/tune_blocks.py). _launch shrinks any shape a
# smaller GPU cannot fit.
GPU_BLOCKS = {
    2: {
        "forward": {64: (128, 128, 8, 2), 128: (128, 128, 8, 2), 256: (128, 64, 8, 2), 512: (64, 32, 4, 2),
                    1024: (32, 32, 4, 1)},
        "forward_positive": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 64, 4, 2), 512: (32, 32, 4, 1),
                             1024: (16, 16, 4, 1)},
        "backward_query": {64: (128, 64, 8, 2), 128: (128, 64, 8, 2), 256: (64, 64, 4, 2), 512: (32, 32, 4, 1),
                           1024: (16, 16, 4, 1)},
        "backward_key": {64: (64, 128, 8, 2), 128: (64, 128, 8, 2), 256: (64, 64, 4, 2), 512: (32, 32, 4, 1),
                         1024: (16, 16, 4, 1)},
        "backward_symmetric": {64: (128, 64, 8, 2), 128: (128, 64, 8, 2), 256: (64, 64, 4, 2),
                               512: (32, 32, 4, 1), 1024: (16, 16, 4, 1)},
    },
    4: {  # float32 takes D <= 512 (_layout.MAX_EMBEDDING_SIZE)
        "forward": {64: (128, 64, 8, 2), 128: (128, 64, 8, 2), 256: (64, 32, 4, 2), 512: (32, 32, 4, 1)},
        "forward_positive": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (32, 32, 4, 1), 512: (16, 16, 4, 1)},
        "backward_query": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (32, 32, 4, 1), 512: (16, 16, 4, 1)},
        "backward_key": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (32, 32, 4, 1), 512: (16, 16, 4, 1)},
        "backward_symmetric": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (32, 32, 4, 1), 512: (16, 16, 4, 1)},
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
    one pipeline stage fewer, then the larger tile side halved (both sides of a square tile;
    16 is tl.dot's minimum)."""
    block_n, block_m, warps, stages = block
    if stages > 1:
        return block_n, block_m, warps, stages - 1
    if max(block_n, block_m) <= 16:
        return None
    if block_n == block_m:
        return block_n // 2, block_m // 2, warps, 2
    if block_n > block_m:
        return block_n // 2, block_m, warps, 2
    return block_n, block_m // 2, warps, 2


def _launch(kernel, kind: str, d_pad: int, element_size: int, args_for, flags):
    """Launch ``kernel`` with its tuned shape, shrinking it while the GPU lacks shared memory.

    ``args_for(block_n, block_m)`` gives the grid and the kernel's arguments for a shape (the tile
    lists depend on it).
    """
    from triton.runtime.errors import OutOfResources

    block = _blocks(kind, d_pad, element_size)
    while True:
        block_n, block_m, warps, stages = block
        grid, args = args_for(block_n, block_m)
        try:
            kernel[grid](*args, **flags, BLOCK_N=block_n, BLOCK_M=block_m, D_PAD=d_pad, num_warps=warps,
                         num_stages=stages)
            return
        except OutOfResources:
            block = smaller_blocks(block)
            if block is None:
                raise
            _SHRUNK[_shape_key(kind, d_pad, element_size)] = block


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 products follow torch's matmul setting. Without TF32 they use three TF32 products
    # (about float32's accuracy) rather than "ieee", which runs on the CUDA cores and measured
    # about 100x slower than bf16 on an H100.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _runs_kernels(device: torch.device) -> bool:
    """Whether Triton launches on ``device`` (CUDA, or anything under the interpreter). Elsewhere (CPU
    tensors without the interpreter: benchmarks/sass_budget.py records the tile kernels' launches
    without running them) the plan comes from its torch twins in _plan.py."""
    return device.type == "cuda" or interpreting()


def gather_rows(x: torch.Tensor, perm: torch.Tensor, normalize: bool, grad: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x's rows in the order ``perm`` as one contiguous (padded rows, D_PAD) copy, their inverse norms
    (float32; 1 without normalisation and on padding rows), and for the backward (``grad``, ``valid``:
    the incoming gradient in the caller's order and the sorted rows' contributing flags) the gather
    programs' maxima (gather_partials_kernel), else None. x is read in place through its strides, rows
    or a (B, C, H, W) map."""
    n, d = num_rows(x), embedding_size(x)
    d_pad, n_pad = padded_size(d), P.padded_rows(n)
    # A key tile of the positive pass may start at any row: POSITIVE_TAIL more rows (zero, norm 1)
    # behind the copy let it load without masks.
    total = n_pad + P.POSITIVE_TAIL
    rows = torch.empty(total, d_pad, dtype=x.dtype, device=x.device)
    inv = torch.empty(total, dtype=torch.float32, device=x.device)
    block = min(P.ROW_PAD, max(1, 4096 // d_pad))
    grid = (triton_cdiv(total, block),)
    partials = None
    if grad is None:
        K.gather_rows_kernel[grid](x, perm, rows, inv, n, total, d, *layout(x), NORMALIZE=normalize, BLOCK=block,
                                   D_PAD=d_pad)
    else:
        partials = torch.empty(3, grid[0], dtype=torch.float32, device=x.device)
        with_grad = valid is not None
        K.gather_partials_kernel[grid](x, perm, rows, inv, n, total, d, *layout(x), grad, grad.stride(0),
                                       valid if with_grad else perm, n_pad, partials, grid[0], NORMALIZE=normalize,
                                       WITH_GRAD=with_grad, BLOCK=block, D_PAD=d_pad)
    return rows[:n_pad], inv[:n_pad], partials


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _flags(inputs: Inputs, settings: Settings) -> dict:
    query = inputs.query
    return dict(DENOM=K.DENOMINATOR_CODES[settings.denominator], HAS_GROUPS=inputs.groups is not None,
                DOT_PRECISION=_dot_precision(query.dtype), UPCAST=interpreting() and query.dtype == torch.bfloat16)


def _kernel_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """τ as the one float32 element the kernels read (no host synchronisation)."""
    return temperature.detach().to(torch.float32).reshape(1)


# ----------------------------------------------------------------------------- the plan, launched


def _plan_rows(q: P.Keys, k: P.Keys | None, settings: Settings, pos_block: int | None):
    """(queries' plan, keys' plan, contributing flags in the caller's order, chunk starts or None): one
    launch of plan_rows_kernel for both sides."""
    device = q.perm.device
    negatives = settings.denominator == "negatives"
    if not _runs_kernels(device):
        return P.rows(q, k, settings.self_key_offset, negatives, pos_block)
    n = q.perm.numel()
    n_pad = P.padded_rows(n)
    q_plan = torch.empty(P.QUERY_FIELDS, n_pad, dtype=torch.int32, device=device)
    out_valid = torch.empty(n, dtype=torch.bool, device=device)
    starts = None if pos_block is None else torch.empty(n_pad, dtype=torch.int32, device=device)
    has_groups = q.gv is not None

    def side(keys: P.Keys) -> tuple:
        return (keys.perm, keys.lk, keys.lv, keys.gk if has_groups else keys.lk, keys.gv if has_groups else keys.lv,
                keys.perm.numel(), P.steps(keys.perm.numel()))

    other = q if k is None else k
    m_pad = n_pad if k is None else P.padded_rows(k.perm.numel())
    k_plan = q_plan.new_empty(0, 0) if k is None else torch.empty(P.KEY_FIELDS, m_pad, dtype=torch.int32,
                                                                 device=device)
    programs = n_pad // P.ROW_PAD + (0 if k is None else m_pad // P.ROW_PAD)
    PK.plan_rows_kernel[(programs,)](
        *side(q), *side(other), q_plan, n_pad, q_plan if k is None else k_plan, m_pad, out_valid,
        q_plan if starts is None else starts, settings.self_key_offset or 0, SYMMETRIC=k is None,
        HAS_GROUPS=has_groups, HAS_SELF=settings.self_key_offset is not None, NEGATIVES=negatives,
        CHUNK_STARTS=starts is not None, POS_BLOCK=pos_block or P.CHUNK, BLOCK=P.ROW_PAD)
    return q_plan, k_plan, out_valid, starts


def _schedule(q_plan: torch.Tensor, k_plan: torch.Tensor, block_n: int, block_m: int, has_groups: bool,
              has_self: bool, by_keys: bool = False, both_valid: bool = False,
              lse_stats: torch.Tensor | None = None) -> P.Schedule:
    """The tile lists of a kernel with tiles of block_n queries and block_m keys that owns query tiles,
    or key tiles (``by_keys``): one launch of plan_schedule_kernel."""
    if not _runs_kernels(q_plan.device):
        cat = P.categories(q_plan, k_plan, block_n, block_m, has_groups, has_self, both_valid, lse_stats)
        return P.schedule(cat.T if by_keys else cat)
    n_pad, m_pad = q_plan.shape[1], k_plan.shape[1]
    q_tiles, k_tiles = n_pad // block_n, m_pad // block_m
    programs, others = (k_tiles, q_tiles) if by_keys else (q_tiles, k_tiles)
    order = torch.empty(programs, others, dtype=torch.int32, device=q_plan.device)
    counts = torch.empty(programs, 3, dtype=torch.int32, device=q_plan.device)
    PK.plan_schedule_kernel[(programs,)](
        q_plan[P.STATS], k_plan[P.STATS], n_pad // P.CHUNK, m_pad // P.CHUNK,
        q_plan if lse_stats is None else lse_stats, others, order, counts, BLOCK_Q=block_n, BLOCK_K=block_m,
        BY_KEYS=by_keys, HAS_GROUPS=has_groups, HAS_SELF=has_self, BOTH_VALID=both_valid,
        SPREAD=lse_stats is not None, SPREAD_LIMIT=P.SYMMETRIC_SPREAD, TILES=_SCHEDULE_TILES)
    return P.Schedule(order, counts)


_SCHEDULE_TILES = 128  # other-side tiles a schedule program categorises at once


def _positive_chunks(q: P.Keys, k: P.Keys | None, starts: torch.Tensor, block: int):
    """each_positive's chunk table and chunk count: a running count of the starts (one op) and one launch
    of plan_chunks_kernel."""
    if not _runs_kernels(starts.device):
        return P.positive_chunks(q, k, starts, block)
    keys = q if k is None else k
    n_pad = starts.numel()
    has_groups = q.gv is not None
    slots = torch.cumsum(starts, 0, dtype=torch.int32)
    table = torch.empty(n_pad, 7, dtype=torch.int32, device=starts.device)
    PK.plan_chunks_kernel[(n_pad // P.ROW_PAD,)](
        starts, slots, n_pad, q.perm, q.lk, q.lv, q.gv if has_groups else q.lv, q.perm.numel(), P.steps(q.perm.numel()),
        keys.perm, keys.lk, keys.lv, keys.gv if has_groups else keys.lv, keys.perm.numel(),
        P.steps(keys.perm.numel()), table, HAS_GROUPS=has_groups, POS_BLOCK=block, BLOCK=P.ROW_PAD)
    return table, slots[-1:]


def _backward_rows(grad_loss, q_plan, n, lse2, pos_sigmoid, q_inv, q_partials, k_inv, k_partials, tau,
                   each_positive: bool, symmetric: bool, block_n: int = P.ROW_PAD, block_m: int = P.ROW_PAD):
    """(weights (rows _plan.W_*), row_max, col_max, lse_stats, scales) of the backward kernels: one launch
    of backward_rows_kernel (see there)."""
    device = lse2.device
    if not _runs_kernels(device):
        return P.backward_rows(grad_loss, q_plan, n, lse2, pos_sigmoid, q_inv, k_inv, tau, each_positive, symmetric,
                               block_n, block_m)
    n_pad = lse2.numel()
    f32 = dict(dtype=torch.float32, device=device)
    weights = torch.empty(P.SYMMETRIC_WEIGHTS if symmetric else P.QUERY_KEY_WEIGHTS, n_pad, **f32)
    row_max = torch.empty(n_pad // block_n, **f32) if symmetric else lse2
    col_max = torch.empty(n_pad // block_m, **f32) if symmetric else lse2
    lse_stats = torch.empty(2 * (n_pad // P.CHUNK), **f32) if symmetric else lse2
    scales = torch.empty(2, **f32)
    k_partials = q_partials if k_partials is None else k_partials
    PK.backward_rows_kernel[(n_pad // P.ROW_PAD,)](
        grad_loss, grad_loss.stride(0), q_plan, n, n_pad, lse2, pos_sigmoid, q_inv, q_partials, q_partials.shape[1],
        k_partials, k_partials.shape[1], tau, weights, row_max, col_max, lse_stats, scales,
        EACH_POSITIVE=each_positive, SYMMETRIC=symmetric, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK=P.ROW_PAD)
    return (weights, row_max if symmetric else None, col_max if symmetric else None,
            lse_stats if symmetric else None, scales)


# ----------------------------------------------------------------------------- forward


class _Ids(NamedTuple):
    """The kernels' id arguments: query and key labels and groups (the labels where there are no
    groups, unread), and the self column."""

    q_label: torch.Tensor
    k_label: torch.Tensor
    q_group: torch.Tensor
    k_group: torch.Tensor
    self_col: torch.Tensor


def _ids(q_plan: torch.Tensor, k_plan: torch.Tensor) -> _Ids:
    return _Ids(q_plan[P.LABEL], k_plan[P.LABEL], q_plan[P.GROUP], k_plan[P.GROUP], q_plan[P.SELF])


def _forward_impl(inputs: Inputs, settings: Settings, symmetric: bool):
    """(loss, valid, lse2, sum_p sigmoid(lse - s_ip), the queries' plan, the keys' plan): the per-row
    statistics in sorted order, the plans (see _plan.py) for the backward."""
    query = inputs.query
    n = num_rows(query)
    d_pad, element_size = padded_size(embedding_size(query)), query.element_size()
    each_positive = settings.denominator == "each_positive"
    q_keys = P.sort_keys(inputs.labels, inputs.groups, settings.ignore_index)
    k_keys = None if symmetric else P.sort_keys(inputs.key_labels, inputs.key_groups, settings.ignore_index)
    pos_block = _blocks("forward_positive", d_pad, element_size)[0] if each_positive else None
    q_plan, k_plan, out_valid, starts = _plan_rows(q_keys, k_keys, settings, pos_block)
    k_side = q_plan if symmetric else k_plan
    q_rows, q_inv, _ = gather_rows(query, q_plan[P.PERM], settings.normalize)
    k_rows, k_inv = (q_rows, q_inv) if symmetric else gather_rows(inputs.key, k_plan[P.PERM], settings.normalize)[:2]
    ids = _ids(q_plan, k_side)
    n_pos, valid = q_plan[P.N_POS], q_plan[P.VALID]
    has_groups, has_self = inputs.groups is not None, settings.self_key_offset is not None
    n_pad = q_rows.shape[0]
    f32 = dict(dtype=torch.float32, device=query.device)
    # The loss in the caller's order (the forward kernels write it through the permutation).
    loss, lse2 = torch.empty(n, **f32), torch.empty(n_pad, **f32)
    # each_positive's positive pass writes the rows of its chunks; the backward reads the contributing ones.
    pos_sigmoid = torch.empty(n_pad, **f32)
    tau = _kernel_temperature(inputs.temperature)

    def args_for(block_n, block_m):
        sched = _schedule(q_plan, k_side, block_n, block_m, has_groups, has_self)
        return (n_pad // block_n,), (q_rows, k_rows, q_inv, k_inv, *ids, sched.order, sched.counts, n_pos, valid,
                                     q_plan[P.PERM], n, loss, lse2, tau, sched.order.shape[1])

    flags = dict(_flags(inputs, settings), HAS_SELF=has_self)
    _launch(K.info_nce_fwd_kernel, "forward", d_pad, element_size, args_for, flags)
    if each_positive:
        def positive_args_for(block_n, block_m):
            if block_m > P.POSITIVE_TAIL:
                raise ValueError(f"the positive pass's key tiles read at most {P.POSITIVE_TAIL} rows past a range, "
                                 f"not BLOCK_M = {block_m}")
            chunk_starts = starts
            if block_n != pos_block:  # a shape shrunk for this GPU: chunks of the shape that runs
                chunk_starts = torch.nn.functional.pad(
                    P.chunk_starts(q_keys, q_keys.lk[q_keys.perm] != P.INT64_MAX, block_n).to(torch.int32),
                    (0, n_pad - n))
            chunks, n_chunks = _positive_chunks(q_keys, k_keys, chunk_starts, block_n)
            # Chunks number at most rows / block_n plus one per class or group run: a grid of twice the
            # row tiles takes them in one round in the usual layouts, and loops otherwise.
            grid = (min(chunks.shape[0], 2 * (n_pad // block_n)),)
            return grid, (q_rows, k_rows, q_inv, k_inv, ids.q_label, ids.k_label, ids.self_col, chunks, n_chunks,
                          n_pos, valid, q_plan[P.PERM], loss, lse2, pos_sigmoid, tau)

        _launch(K.info_nce_fwd_positive_kernel, "forward_positive", d_pad, element_size, positive_args_for,
                dict({k: flags[k] for k in ("DOT_PRECISION", "UPCAST", "HAS_SELF")}, INTERPRETED=interpreting()))
    return loss, out_valid, lse2, pos_sigmoid, q_plan, k_plan


def _forward(*args):
    _, inputs, _, settings = _split(args)
    return _forward_impl(inputs, settings, symmetric=False)


def _forward_symmetric(*args):
    _, inputs, _, settings = _split(args)
    return _forward_impl(inputs, settings, symmetric=True)


def _forward_fake(*args, symmetric: bool = False):
    _, inputs, _, _ = _split(args)
    query = inputs.query
    n = num_rows(query)
    n_pad = P.padded_rows(n)
    k_plan = (0, 0) if symmetric else (P.KEY_FIELDS, P.padded_rows(num_rows(inputs.key)))
    return (query.new_empty(n, dtype=torch.float32), query.new_empty(n, dtype=torch.bool),
            query.new_empty(n_pad, dtype=torch.float32), query.new_empty(n_pad, dtype=torch.float32),
            query.new_empty(P.QUERY_FIELDS, n_pad, dtype=torch.int32), query.new_empty(k_plan, dtype=torch.int32))


def _forward_symmetric_fake(*args):
    return _forward_fake(*args, symmetric=True)


_FORWARD_RETURNS = "(" + ", ".join(["Tensor"] * 6) + ")"
forward_op = torch.library.custom_op("contrastkit::info_nce_rows_triton", _forward, mutates_args=(),
                                     schema=_schema(_FORWARD_RETURNS))
forward_op.register_fake(_forward_fake)
symmetric_forward_op = torch.library.custom_op("contrastkit::info_nce_rows_triton_symmetric", _forward_symmetric,
                                               mutates_args=(), schema=_schema(_FORWARD_RETURNS))
symmetric_forward_op.register_fake(_forward_symmetric_fake)

# The forward's outputs the backward takes: the sorted rows' log2-sum-exps and (each_positive) sums of
# sigmoids, and the plan of each side.
_SAVED = "Tensor lse, Tensor pos_sigmoid, Tensor q_plan, Tensor k_plan"


# ----------------------------------------------------------------------------- backward


def _gradient_rows(grad: torch.Tensor) -> torch.Tensor | None:
    """``grad`` as a contiguous (rows, D) view, or None where its layout has none (an NCHW map)."""
    rows = grad if grad.dim() == 2 else grad.permute(0, 2, 3, 1)
    rows = rows.reshape(num_rows(grad), embedding_size(grad)) if rows.is_contiguous() else None
    return rows if rows is not None and rows.data_ptr() == grad.data_ptr() else None


class _GradientBuffer:
    """Where a kernel writes a gradient: contiguous (rows, D), the output itself when its layout
    allows (rows, channels-last maps), else a buffer copied into the output's layout afterwards."""

    def __init__(self, like: torch.Tensor):
        self.out = torch.empty_like(like)
        view = _gradient_rows(self.out)
        self.rows = view if view is not None else torch.empty(num_rows(like), embedding_size(like),
                                                            dtype=like.dtype, device=like.device)

    def finish(self) -> torch.Tensor:
        if self.rows.data_ptr() != self.out.data_ptr():
            if self.out.dim() == 2:
                self.out.copy_(self.rows)
            else:
                b, c, h, w = self.out.shape
                self.out.copy_(self.rows.view(b, h, w, c).permute(0, 3, 1, 2))
        return self.out


def _backward_impl(grad_loss, inputs: Inputs, lse2, pos_sigmoid, q_plan, k_plan, need_query, need_key,
                   need_temperature, settings: Settings, symmetric: bool):
    query, key = inputs.query, inputs.key
    n, m = num_rows(query), num_rows(key)
    each_positive = settings.denominator == "each_positive"
    has_groups, has_self = inputs.groups is not None, settings.self_key_offset is not None
    q_rows, q_inv, q_partials = gather_rows(query, q_plan[P.PERM], settings.normalize, grad_loss, q_plan[P.VALID])
    tau = _kernel_temperature(inputs.temperature)
    flags = _flags(inputs, settings)
    element_size = query.element_size()
    d_pad = q_rows.shape[1]
    n_pad = q_rows.shape[0]
    if symmetric:
        grad = _GradientBuffer(query)
        tau_rows = torch.empty(n_pad if need_temperature else 0, dtype=torch.float32, device=query.device)
        ids = _ids(q_plan, q_plan)

        def args_for(block_n, block_m):
            weights, row_max, col_max, lse_stats, scales = _backward_rows(
                grad_loss, q_plan, n, lse2, pos_sigmoid, q_inv, q_partials, None, None, tau, each_positive, True,
                block_n, block_m)
            sched = _schedule(q_plan, q_plan, block_n, block_m, has_groups, True, both_valid=True, lse_stats=lse_stats)
            w = lambda row: weights[row]  # noqa: E731
            return (n_pad // block_n,), (
                q_rows, q_inv, ids.q_label, ids.q_group, sched.order, sched.counts, w(P.W_LSE), w(P.W_A), w(P.W_B),
                w(P.W_ALPHA), w(P.W_BETA), row_max, col_max, scales[:1], tau, n_pad // block_m, q_plan[P.PERM],
                grad.rows, tau_rows, n, embedding_size(query))

        _launch(K.info_nce_bwd_symmetric_kernel, "backward_symmetric", d_pad, element_size, args_for,
                dict(flags, NORMALIZE=settings.normalize, TAU_GRAD=need_temperature))
        # Every pair appears twice in the rows' sums (as ij and as ji).
        return grad.finish(), None, _temperature_gradient(tau_rows, tau, 2.0) if need_temperature else None

    k_rows, k_inv, k_partials = gather_rows(key, k_plan[P.PERM], settings.normalize, grad_loss)
    weights, _, _, _, scales = _backward_rows(grad_loss, q_plan, n, lse2, pos_sigmoid, q_inv, q_partials, k_inv,
                                              k_partials, tau, each_positive, False)
    w = lambda row: weights[row]  # noqa: E731
    ids = _ids(q_plan, k_plan)
    run_query = need_query or (need_temperature and not need_key)
    grad_query = _GradientBuffer(query) if run_query else None
    grad_key = _GradientBuffer(key) if need_key else None
    # The kernel that adds up the temperature's gradient writes every row of its side.
    tau_rows = torch.empty((n_pad if run_query else k_rows.shape[0]) if need_temperature else 0,
                           dtype=torch.float32, device=query.device)
    flags = dict(flags, NORMALIZE=settings.normalize, HAS_SELF=has_self)
    if run_query:
        def query_args(block_n, block_m):
            sched = _schedule(q_plan, k_plan, block_n, block_m, has_groups, has_self)
            return (n_pad // block_n,), (
                q_rows, k_rows, q_inv, k_inv, *ids, sched.order, sched.counts, w(P.W_LSE), w(P.W_A), w(P.W_B),
                w(P.W_G), scales[1:], tau, sched.order.shape[1], q_plan[P.PERM], grad_query.rows, tau_rows, n,
                embedding_size(query))

        _launch(K.info_nce_bwd_query_kernel, "backward_query", d_pad, element_size, query_args,
                dict(flags, TAU_GRAD=need_temperature))
    if need_key:
        def key_args(block_n, block_m):
            sched = _schedule(q_plan, k_plan, block_n, block_m, has_groups, has_self, by_keys=True)
            return (k_rows.shape[0] // block_m,), (
                q_rows, k_rows, w(P.W_Q_SCALE), k_inv, *ids, sched.order, sched.counts, w(P.W_LSE), w(P.W_A_KEY),
                w(P.W_B_KEY), scales[:1], tau, sched.order.shape[1], k_plan[P.PERM], grad_key.rows, tau_rows, m,
                embedding_size(key))

        _launch(K.info_nce_bwd_key_kernel, "backward_key", d_pad, element_size, key_args,
                dict(flags, TAU_GRAD=need_temperature and not run_query))
    grad_query = grad_query.finish() if need_query else None
    grad_key = grad_key.finish() if need_key else None
    return grad_query, grad_key, _temperature_gradient(tau_rows, tau, 1.0) if need_temperature else None


def _temperature_gradient(tau_rows: torch.Tensor, tau: torch.Tensor, pairs: float) -> torch.Tensor:
    """-(1/tau) sum_ij dL/ds_ij s_ij from its per-row sums, each pair counted ``pairs`` times."""
    return tau_rows.sum() / (tau[0] * -pairs)


def _backward(*args):
    """(grad query, grad key, grad temperature).

    The temperature's gradient is -(1/tau) sum_ij dL/ds_ij s_ij; one of the kernels adds up
    sum_j dL/ds_ij s_ij per row in its epilogue from its accumulator (dq's when it runs).
    """
    (grad_loss,), inputs, after, settings = _split(args, 1)
    grad_query, grad_key, grad_tau = _backward_impl(grad_loss, inputs, *after, settings, symmetric=False)
    return (_or_unwritten(grad_query, inputs.query), _or_unwritten(grad_key, inputs.key),
            _temperature_result(grad_tau, inputs.temperature))


def _or_unwritten(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A gradient that was not asked for is left unwritten (the autograd formula drops it)."""
    return torch.empty_like(like) if grad is None else grad


def _temperature_result(grad_tau: torch.Tensor | None, temperature: torch.Tensor) -> torch.Tensor:
    return _or_unwritten(None if grad_tau is None else grad_tau.to(temperature.dtype).reshape(temperature.shape),
                         temperature)


def _backward_symmetric_op(*args):
    """(grad of the rows, grad temperature) of self-contrast."""
    (grad_loss,), inputs, after, settings = _split(args, 1)
    grad, _, grad_tau = _backward_impl(grad_loss, inputs, *after, settings, symmetric=True)
    return grad, _temperature_result(grad_tau, inputs.temperature)


def _backward_fake(*args):
    _, inputs, _, _ = _split(args, 1)
    return torch.empty_like(inputs.query), torch.empty_like(inputs.key), torch.empty_like(inputs.temperature)


def _backward_symmetric_fake(*args):
    _, inputs, _, _ = _split(args, 1)
    return torch.empty_like(inputs.query), torch.empty_like(inputs.temperature)


_BACKWARD_AFTER = _SAVED + ", bool need_query, bool need_key, bool need_temperature"
backward_op = torch.library.custom_op(
    "contrastkit::info_nce_rows_triton_backward", _backward, mutates_args=(),
    schema=_schema("(Tensor, Tensor, Tensor)", "Tensor grad_loss", _BACKWARD_AFTER))
backward_op.register_fake(_backward_fake)
symmetric_backward_op = torch.library.custom_op(
    "contrastkit::info_nce_rows_triton_symmetric_backward", _backward_symmetric_op, mutates_args=(),
    schema=_schema("(Tensor, Tensor)", "Tensor grad_loss", _BACKWARD_AFTER))
symmetric_backward_op.register_fake(_backward_symmetric_fake)


def _setup_context(ctx, inputs, output):
    _, _, *saved = output
    tensors = len(Inputs._fields)
    ctx.save_for_backward(*inputs[:tensors], *saved)
    ctx.settings = inputs[tensors:]
    # Only the loss has a gradient: no zeros for the other outputs' (a kernel each).
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad_loss, *_unused_grads):
    if grad_loss is None:  # the loss took no part in what was differentiated
        return _input_gradients()
    need = dict(zip(Inputs._fields, ctx.needs_input_grad, strict=False))
    grad_query, grad_key, grad_temperature = backward_op(
        grad_loss, *ctx.saved_tensors, need["query"], need["key"], need["temperature"], *ctx.settings)
    return _input_gradients(query=grad_query if need["query"] else None, key=grad_key if need["key"] else None,
                           temperature=grad_temperature if need["temperature"] else None)


def _autograd_backward_symmetric(ctx, grad_loss, *_unused_grads):
    # query and key are one tensor: its whole gradient is returned once, as the query's.
    if grad_loss is None:
        return _input_gradients()
    need = dict(zip(Inputs._fields, ctx.needs_input_grad, strict=False))
    need_rows = need["query"] or need["key"]
    grad, grad_temperature = symmetric_backward_op(
        grad_loss, *ctx.saved_tensors, need_rows, need_rows, need["temperature"], *ctx.settings)
    return _input_gradients(query=grad if need_rows else None,
                           temperature=grad_temperature if need["temperature"] else None)


forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)
symmetric_forward_op.register_autograd(_autograd_backward_symmetric, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "second derivatives (create_graph=True, e.g. a gradient penalty) of the fused InfoNCE kernels are "
        "not implemented: compute that loss with backend='dense' (or 'reference'), which autograd "
        "differentiates twice")


for _op in (backward_op, symmetric_backward_op):
    _op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got a {x.device.type} tensor); set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels on the CPU, or use backend='torch'"
        )


def is_self_contrast(inputs: Inputs, settings: Settings) -> bool:
    """Keys, key labels and key groups are the queries' own tensors, each query excluded from its
    own key: the symmetric backward applies."""
    return (settings.self_key_offset == 0 and inputs.key is inputs.query and inputs.key_labels is inputs.labels
            and inputs.key_groups is inputs.groups)


def info_nce_rows(query: torch.Tensor, key: torch.Tensor, labels: torch.Tensor, key_labels: torch.Tensor,
                  groups: torch.Tensor | None, key_groups: torch.Tensor | None, temperature: torch.Tensor, *,
                  denominator: str, normalize: bool, ignore_index: int,
                  self_key_offset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row masked InfoNCE (float32, 0 where a row does not contribute) and the contributing mask.

    query and key are (N, D) / (M, D) rows or (B, C, H, W) maps of one kernel dtype; labels, groups and
    their key sides are integer ids (see :class:`Inputs` and :class:`Settings`). Self-contrast passes the
    query tensor as key, its labels and groups as the keys' and ``self_key_offset=0``. Differentiable
    w.r.t. query, key and temperature.
    """
    if denominator not in K.DENOMINATOR_CODES:
        raise ValueError(f"denominator must be one of {sorted(K.DENOMINATOR_CODES)}; got {denominator!r}")
    inputs = Inputs(query, key, labels, key_labels, groups, key_groups, temperature)
    settings = Settings(denominator, normalize, ignore_index, self_key_offset)
    for name, x in (("query", query), ("key", key)):
        check_kernel_input(name, x)
        _check_device(x)
    symmetric = is_self_contrast(inputs, settings)
    # O(N) id vectors as int64 (the plan ranks them into dense int32 ids).
    labels = labels.to(torch.int64)
    groups = None if groups is None else groups.to(torch.int64)
    inputs = inputs._replace(
        labels=labels, key_labels=labels if symmetric else key_labels.to(torch.int64),
        groups=groups, key_groups=groups if symmetric else (None if key_groups is None else key_groups.to(torch.int64)))
    op = symmetric_forward_op if symmetric else forward_op
    loss, valid, *_ = op(*inputs, *settings)
    return loss, valid
