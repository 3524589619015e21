"""Launchers and autograd of the fused masked InfoNCE (see ``_info_nce_kernels.py`` and ``_plan.py``).

Each call sorts both sides by (group, label) (``_plan.make_plan``), gathers each side once into a
contiguous, padded (rows, D_PAD) copy with its rows' inverse norms, and lists per program the
other side's tiles to visit (clean first, then masked). The forward saves O(N) statistics in
sorted order: per query row the log2-sum-exp of its denominator set, the positive count and
(``each_positive``) the sum over positives of sigmoid(lse - s_ip). The backward recomputes the
order and the copies (O((N + M) D)) and turns the statistics into two per-row weights,

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
# Largest magnitude of a prescaled low-precision operand: 2^13 leaves 2^2 of headroom under fp16's
# 65504 for the sum of up to four terms (symmetric kernel), and keeps probabilities of 2^-30 normal.
_PRESCALE_EXPONENT = 13.0


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


def gather_rows(x: torch.Tensor, perm: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x's rows in the order ``perm`` as one contiguous (padded rows, D_PAD) copy, and their inverse
    norms (float32; 1 without normalisation and on padding rows). x is read in place through its
    strides, rows or a (B, C, H, W) map."""
    n, d = num_rows(x), embedding_size(x)
    d_pad, n_pad = padded_size(d), P.padded_rows(n)
    # A key tile of the positive pass may start at any row: POSITIVE_TAIL more rows (zero, norm 1)
    # behind the copy let it load without masks.
    total = n_pad + P.POSITIVE_TAIL
    rows = torch.empty(total, d_pad, dtype=x.dtype, device=x.device)
    inv = torch.empty(total, dtype=torch.float32, device=x.device)
    block = min(P.ROW_PAD, max(1, 4096 // d_pad))
    K.gather_rows_kernel[(triton_cdiv(total, block),)](x, perm, rows, inv, n, total, d, *layout(x),
                                                       NORMALIZE=normalize, BLOCK=block, D_PAD=d_pad)
    return rows[:n_pad], inv[:n_pad]


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _flags(inputs: Inputs, settings: Settings) -> dict:
    query = inputs.query
    return dict(DENOM=K.DENOMINATOR_CODES[settings.denominator], HAS_GROUPS=inputs.groups is not None,
                DOT_PRECISION=_dot_precision(query.dtype), UPCAST=interpreting() and query.dtype == torch.bfloat16)


def _kernel_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """τ as the one float32 element the kernels read (no host synchronisation)."""
    return temperature.detach().to(torch.float32).reshape(1)


class _Prepared:
    """What the kernels read of a call: the plan, the gathered copies and their norms. The forward
    makes the plan; the backward takes it from the forward's outputs and gathers the copies again."""

    def __init__(self, plan: P.Plan, inputs: Inputs, settings: Settings):
        self.plan = plan
        self.q_rows, self.q_inv = gather_rows(inputs.query, plan.q.perm, settings.normalize)
        if plan.symmetric:
            self.k_rows, self.k_inv = self.q_rows, self.q_inv
        else:
            self.k_rows, self.k_inv = gather_rows(inputs.key, plan.k.perm, settings.normalize)
        dummy = plan.q.label
        self.ids = (plan.q.label, plan.k.label, dummy if plan.q.group is None else plan.q.group,
                    dummy if plan.k.group is None else plan.k.group,
                    dummy if plan.self_col is None else plan.self_col)
        self.d_pad = self.q_rows.shape[1]

    def schedule(self, block_n: int, block_m: int, by_keys: bool = False) -> P.Schedule:
        cat = P.categories(self.plan, block_n, block_m)
        return P.schedule(cat.T if by_keys else cat)


def _forward_impl(inputs: Inputs, settings: Settings, symmetric: bool):
    """(loss, valid, lse2, sum_p sigmoid(lse - s_ip), the queries' plan, the keys' plan): the per-row
    statistics in sorted order, the plans as _plan.pack keeps them for the backward."""
    query = inputs.query
    n = num_rows(query)
    plan = P.make_plan(inputs.labels, inputs.key_labels, inputs.groups, inputs.key_groups, settings.ignore_index,
                       settings.self_key_offset, symmetric)
    prep = _Prepared(plan, inputs, settings)
    n_pad = prep.q_rows.shape[0]
    f32 = dict(dtype=torch.float32, device=query.device)
    loss, lse2 = torch.empty(n_pad, **f32), torch.empty(n_pad, **f32)
    # each_positive's positive pass writes the rows of its chunks (the contributing ones); no other reads it.
    pos_sigmoid = (torch.zeros if settings.denominator == "each_positive" else torch.empty)(n_pad, **f32)
    n_pos, n_candidates = P.pair_counts(prep.plan)
    valid = n_pos > 0  # (0 on ignored rows)
    if settings.denominator == "negatives":
        valid &= n_candidates > n_pos
    tau = _kernel_temperature(inputs.temperature)

    def args_for(block_n, block_m):
        sched = prep.schedule(block_n, block_m)
        return (n_pad // block_n,), (prep.q_rows, prep.k_rows, prep.q_inv, prep.k_inv, *prep.ids, sched.order,
                                     sched.counts, n_pos, valid.view(torch.int8), loss, lse2, tau,
                                     sched.order.shape[1])

    flags = dict(_flags(inputs, settings), HAS_SELF=settings.self_key_offset is not None)
    _launch(K.info_nce_fwd_kernel, "forward", prep.d_pad, query.element_size(), args_for, flags)
    if settings.denominator == "each_positive":
        def positive_args_for(block_n, block_m):
            if block_m > P.POSITIVE_TAIL:
                raise ValueError(f"the positive pass's key tiles read at most {P.POSITIVE_TAIL} rows past a range, "
                                 f"not BLOCK_M = {block_m}")
            chunks, n_chunks = P.positive_chunks(prep.plan, block_n)
            q_label, k_label, _, _, self_col = prep.ids
            # Chunks number at most rows / block_n plus one per class or group run: a grid of twice the
            # row tiles takes them in one round in the usual layouts, and loops otherwise.
            grid = (min(chunks.shape[0], 2 * (n_pad // block_n)),)
            return grid, (prep.q_rows, prep.k_rows, prep.q_inv, prep.k_inv, q_label, k_label, self_col, chunks,
                          n_chunks, n_pos, valid.view(torch.int8), loss, lse2, pos_sigmoid, tau)

        _launch(K.info_nce_fwd_positive_kernel, "forward_positive", prep.d_pad, query.element_size(),
                positive_args_for, dict({k: flags[k] for k in ("DOT_PRECISION", "UPCAST", "HAS_SELF")},
                                        INTERPRETED=interpreting()))
    perm = prep.plan.q.perm
    out_loss = torch.empty(n, **f32)
    out_loss[perm] = loss[:n]
    out_valid = torch.empty(n, dtype=torch.bool, device=query.device)
    out_valid[perm] = valid[:n]
    return out_loss, out_valid, lse2, pos_sigmoid, *P.pack(plan, n_pos, valid)


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

_SAVED = "Tensor lse, Tensor pos_sigmoid, Tensor q_plan, Tensor k_plan"


def _pow2_prescale(largest: torch.Tensor) -> torch.Tensor:
    """A power of two that brings ``largest`` (>= 0, a device scalar) to about 2^13; 1 for 0."""
    exponent = _PRESCALE_EXPONENT - torch.ceil(torch.log2(largest.clamp_min(1e-30)))
    return torch.where(largest > 0, torch.exp2(exponent.clamp(-100.0, 100.0)), 1.0).reshape(1)


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


class _RowWeights:
    """The backward's per-row inputs in sorted order (see the module docstring)."""

    def __init__(self, grad_loss, sorted_valid, lse2, n_pos, pos_sigmoid, perm, settings: Settings):
        n, n_pad = perm.numel(), lse2.numel()
        sorted_valid = sorted_valid != 0
        g = torch.zeros(n_pad, dtype=torch.float32, device=lse2.device)
        g[:n] = grad_loss.to(torch.float32)[perm]
        self.g = torch.where(sorted_valid, g, 0.0)  # g_i
        count = n_pos.clamp_min(1).to(torch.float32)
        self.b = torch.where(sorted_valid, 1.0 / count, 0.0)  # b_i / g_i
        self.a = self.b * pos_sigmoid if settings.denominator == "each_positive" else sorted_valid.to(torch.float32)
        self.lse2 = lse2  # log2-sum-exp of every row, as the forward found it
        # +inf makes 2^(x c - lse2) vanish on rows that do not contribute, whatever their logits.
        self.lse2_masked = torch.where(sorted_valid, lse2, float("inf"))


def _backward_impl(grad_loss, inputs: Inputs, lse2, pos_sigmoid, q_plan, k_plan, need_query, need_key,
                   need_temperature, settings: Settings, symmetric: bool):
    query, key = inputs.query, inputs.key
    plan, n_pos, valid = P.unpack(q_plan, k_plan, num_rows(query), num_rows(key), inputs.groups is not None,
                                  settings.self_key_offset is not None, symmetric)
    prep = _Prepared(plan, inputs, settings)
    weights = _RowWeights(grad_loss, valid, lse2, n_pos, pos_sigmoid, plan.q.perm, settings)
    tau = _kernel_temperature(inputs.temperature)
    flags = _flags(inputs, settings)
    element_size = query.element_size()
    n_pad = prep.q_rows.shape[0]
    if symmetric:
        grad = _GradientBuffer(query)
        tau_rows = torch.empty(n_pad if need_temperature else 0, dtype=torch.float32, device=query.device)
        _backward_symmetric(prep, weights, tau, grad.rows, tau_rows, inputs, settings, flags, need_temperature)
        # Every pair appears twice in the rows' sums (as ij and as ji).
        return grad.finish(), None, _temperature_gradient(tau_rows, tau, 2.0) if need_temperature else None

    run_query = need_query or (need_temperature and not need_key)
    grad_query = _GradientBuffer(query) if run_query else None
    grad_key = _GradientBuffer(key) if need_key else None
    # The kernel that adds up the temperature's gradient writes every row of its side.
    tau_rows = torch.empty((n_pad if run_query else prep.k_rows.shape[0]) if need_temperature else 0,
                           dtype=torch.float32, device=query.device)
    common = (prep.q_rows, prep.k_rows, prep.q_inv, prep.k_inv, *prep.ids)
    flags = dict(flags, NORMALIZE=settings.normalize, HAS_SELF=settings.self_key_offset is not None)
    if run_query:
        col_scale = _pow2_prescale(prep.k_inv.amax())

        def query_args(block_n, block_m):
            sched = prep.schedule(block_n, block_m)
            return (n_pad // block_n,), (*common, sched.order, sched.counts, weights.lse2_masked, weights.a, weights.b,
                                         weights.g, col_scale, tau, sched.order.shape[1], plan.q.perm,
                                         grad_query.rows, tau_rows, num_rows(query), embedding_size(query))

        _launch(K.info_nce_bwd_query_kernel, "backward_query", prep.d_pad, element_size, query_args,
                dict(flags, TAU_GRAD=need_temperature))
    if need_key:
        row_weight = weights.g * prep.q_inv
        scale = _pow2_prescale(row_weight.abs().amax())
        a, b = weights.a * row_weight * scale, weights.b * row_weight * scale
        q_scale = prep.q_inv * (K.LOG2E.value / tau)  # c_i, the logits' per-query factor in log2 units
        key_common = (prep.q_rows, prep.k_rows, q_scale, *common[3:])

        def key_args(block_n, block_m):
            sched = prep.schedule(block_n, block_m, by_keys=True)
            return (prep.k_rows.shape[0] // block_m,), (
                *key_common, sched.order, sched.counts, weights.lse2_masked, a, b, scale, tau, sched.order.shape[1],
                plan.k.perm, grad_key.rows, tau_rows, num_rows(key), embedding_size(key))

        _launch(K.info_nce_bwd_key_kernel, "backward_key", prep.d_pad, element_size, key_args,
                dict(flags, TAU_GRAD=need_temperature and not run_query))
    grad_query = grad_query.finish() if need_query else None
    grad_key = grad_key.finish() if need_key else None
    return grad_query, grad_key, _temperature_gradient(tau_rows, tau, 1.0) if need_temperature else None


def _temperature_gradient(tau_rows: torch.Tensor, tau: torch.Tensor, pairs: float) -> torch.Tensor:
    """-(1/tau) sum_ij dL/ds_ij s_ij from its per-row sums, each pair counted ``pairs`` times."""
    return tau_rows.sum() / (tau[0] * -pairs)


def _spread_weight(a: torch.Tensor, tile_max: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """a 2^(tile max - lse2), 0 where a is 0, the exponent clamped to [0, 126]."""
    exponent = torch.nan_to_num((tile_max - lse2).clamp(0.0, 126.0), nan=0.0)
    return torch.where(a == 0, 0.0, a * torch.exp2(exponent))


def _backward_symmetric(prep: _Prepared, weights: _RowWeights, tau, grad, tau_rows, inputs: Inputs,
                        settings: Settings, flags: dict, need_temperature: bool):
    plan = prep.plan
    inv = prep.q_inv
    scale = _pow2_prescale(weights.g.abs().amax() * inv.amax())
    a, b = weights.a * weights.g * scale, weights.b * weights.g * scale

    def args_for(block_n, block_m):
        sched = P.schedule(P.symmetric_categories(plan, block_n, block_m, weights.lse2))
        row_max, col_max = P.tile_max(plan, weights.lse2, block_n), P.tile_max(plan, weights.lse2, block_m)
        # alpha_r = a_r 2^(max of r's row tile - L_r), beta_j = a_j |x_j|^-1 2^(max of j's column tile - L_j);
        # the exponents are within P.SYMMETRIC_SPREAD wherever they are used (clean and positive
        # tiles), clamped elsewhere.
        alpha = _spread_weight(a, row_max.repeat_interleave(block_n), weights.lse2)
        beta = _spread_weight(a, col_max.repeat_interleave(block_m), weights.lse2) * inv
        tiles = inv.numel() // block_m
        return (inv.numel() // block_n,), (
            prep.q_rows, inv, plan.q.label, prep.ids[2], sched.order, sched.counts, weights.lse2_masked, a, b,
            alpha, beta, torch.nan_to_num(row_max, neginf=0.0), torch.nan_to_num(col_max, neginf=0.0), scale, tau,
            tiles, plan.q.perm, grad, tau_rows, num_rows(inputs.query), embedding_size(inputs.query))

    _launch(K.info_nce_bwd_symmetric_kernel, "backward_symmetric", prep.d_pad, inputs.query.element_size(),
            args_for, dict(flags, NORMALIZE=settings.normalize, TAU_GRAD=need_temperature))


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
