"""Fused patch pooling: the mean of a (B, C, H, W) map over each cell of a grid_h x grid_w grid,
optionally L2-normalised over C in the same pass, forward and backward.

One program owns one (image, cell) pair and all C channels of it, so the normalisation needs
no second pass and every gradient element is written by exactly one program (no atomics).
The grid must divide the map (H % grid_h == 0 and W % grid_w == 0): cells then do not overlap
and each is (H / grid_h) x (W / grid_w) pixels, the same as ``F.avg_pool2d`` with that kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._info_nce_kernels import _inverse_norm
from ._layout import KERNEL_DTYPES, interpreting

# Elements of one (channels x pixels) tile: bounds register use for any C.
_TILE_ELEMENTS = 4096


@triton.jit
def _cell_offsets(pid, C, grid_h, grid_w, cell_h, cell_w, pixel, sB, sC, sH, sW, C_PAD: tl.constexpr):
    """Offsets and mask of the (C_PAD, len(pixel)) tile of pixels `pixel` of cell `pid`."""
    cells = grid_h * grid_w
    b = pid // cells
    row = (pid % cells) // grid_w
    col = pid % grid_w
    h = row * cell_h + pixel // cell_w
    w = col * cell_w + pixel % cell_w
    channels = tl.arange(0, C_PAD)
    offsets = (b.to(tl.int64) * sB + channels.to(tl.int64)[:, None] * sC
               + (h.to(tl.int64) * sH + w.to(tl.int64) * sW)[None, :])
    mask = (channels < C)[:, None] & (pixel < cell_h * cell_w)[None, :]
    return offsets, mask


@triton.jit
def _out_offsets(pid, grid_h, grid_w, sB, sC, sH, sW, C_PAD: tl.constexpr):
    cells = grid_h * grid_w
    b = pid // cells
    row = (pid % cells) // grid_w
    col = pid % grid_w
    channels = tl.arange(0, C_PAD)
    return b.to(tl.int64) * sB + channels.to(tl.int64) * sC + row * sH + col * sW


@triton.jit
def pool_fwd_kernel(x_ptr, out_ptr, inv_norm_ptr, C, grid_h, grid_w, cell_h, cell_w,
                    x_sB, x_sC, x_sH, x_sW, o_sB, o_sC, o_sH, o_sW,
                    NORMALIZE: tl.constexpr, C_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([C_PAD], tl.float32)
    for start in range(0, cell_h * cell_w, BLOCK_P):
        pixel = start + tl.arange(0, BLOCK_P)
        offsets, mask = _cell_offsets(pid, C, grid_h, grid_w, cell_h, cell_w, pixel,
                                      x_sB, x_sC, x_sH, x_sW, C_PAD)
        acc += tl.sum(tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32), axis=1)
    mean = acc / (cell_h * cell_w)
    if NORMALIZE:
        inv = _inverse_norm(mean, 0)
        tl.store(inv_norm_ptr + pid, inv)
        mean = mean * inv
    channels = tl.arange(0, C_PAD)
    tl.store(out_ptr + _out_offsets(pid, grid_h, grid_w, o_sB, o_sC, o_sH, o_sW, C_PAD), mean,
             mask=channels < C)


@triton.jit
def pool_bwd_kernel(grad_out_ptr, out_ptr, inv_norm_ptr, grad_x_ptr, C, grid_h, grid_w, cell_h, cell_w,
                    g_sB, g_sC, g_sH, g_sW, o_sB, o_sC, o_sH, o_sW, x_sB, x_sC, x_sH, x_sW,
                    NORMALIZE: tl.constexpr, C_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    channels = tl.arange(0, C_PAD)
    grad = tl.load(grad_out_ptr + _out_offsets(pid, grid_h, grid_w, g_sB, g_sC, g_sH, g_sW, C_PAD),
                   mask=channels < C, other=0.0).to(tl.float32)
    if NORMALIZE:
        # out = mean·inv, inv = 1 / sqrt(|mean|² + floor²): the gradient is inv·(g - out (out·g)).
        unit = tl.load(out_ptr + _out_offsets(pid, grid_h, grid_w, o_sB, o_sC, o_sH, o_sW, C_PAD),
                       mask=channels < C, other=0.0).to(tl.float32)
        inv = tl.load(inv_norm_ptr + pid)
        grad = (grad - unit * tl.sum(unit * grad, axis=0)) * inv
    grad = grad / (cell_h * cell_w)
    for start in range(0, cell_h * cell_w, BLOCK_P):
        pixel = start + tl.arange(0, BLOCK_P)
        offsets, mask = _cell_offsets(pid, C, grid_h, grid_w, cell_h, cell_w, pixel,
                                      x_sB, x_sC, x_sH, x_sW, C_PAD)
        tl.store(grad_x_ptr + offsets, tl.zeros([C_PAD, BLOCK_P], tl.float32) + grad[:, None], mask=mask)


def _tile(channels: int) -> tuple[int, int]:
    c_pad = max(2, triton.next_power_of_2(channels))
    return c_pad, max(2, _TILE_ELEMENTS // c_pad)


@torch.library.custom_op("contrastkit::pool_patches_triton", mutates_args=())
def pool_patches_triton(features: torch.Tensor, grid_h: int, grid_w: int,
                        normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (B, C, grid_h, grid_w) in the input dtype, per-cell inverse norm of the mean in float32)."""
    b, c, h, w = features.shape
    out = features.new_empty(b, c, grid_h, grid_w)
    inv_norm = torch.zeros(b * grid_h * grid_w, dtype=torch.float32, device=features.device)
    c_pad, block_p = _tile(c)
    pool_fwd_kernel[(b * grid_h * grid_w,)](
        features, out, inv_norm, c, grid_h, grid_w, h // grid_h, w // grid_w, *features.stride(), *out.stride(),
        NORMALIZE=normalize, C_PAD=c_pad, BLOCK_P=block_p)
    return out, inv_norm


@pool_patches_triton.register_fake
def _(features, grid_h, grid_w, normalize):
    b, c = features.shape[:2]
    inv_norm = features.new_empty(b * grid_h * grid_w, dtype=torch.float32)
    return features.new_empty(b, c, grid_h, grid_w), inv_norm


@torch.library.custom_op("contrastkit::pool_patches_triton_backward", mutates_args=())
def pool_patches_triton_backward(
    grad_out: torch.Tensor, features: torch.Tensor, out: torch.Tensor, inv_norm: torch.Tensor,
    grid_h: int, grid_w: int, normalize: bool,
) -> torch.Tensor:
    b, c, h, w = features.shape
    grad_features = torch.empty_like(features)
    c_pad, block_p = _tile(c)
    pool_bwd_kernel[(b * grid_h * grid_w,)](
        grad_out, out, inv_norm, grad_features, c, grid_h, grid_w, h // grid_h, w // grid_w,
        *grad_out.stride(), *out.stride(), *grad_features.stride(),
        NORMALIZE=normalize, C_PAD=c_pad, BLOCK_P=block_p)
    return grad_features


@pool_patches_triton_backward.register_fake
def _(grad_out, features, out, inv_norm, grid_h, grid_w, normalize):
    return torch.empty_like(features)


def _setup_context(ctx, inputs, output):
    features, grid_h, grid_w, normalize = inputs
    ctx.save_for_backward(features, *output)
    ctx.options = (grid_h, grid_w, normalize)


def _backward(ctx, grad_out, _grad_inv_norm):
    features, out, inv_norm = ctx.saved_tensors
    return pool_patches_triton_backward(grad_out, features, out, inv_norm, *ctx.options), None, None, None


pool_patches_triton.register_autograd(_backward, setup_context=_setup_context)


def pool_patches(features: torch.Tensor, grid_h: int, grid_w: int, normalize: bool) -> torch.Tensor:
    """Mean of each cell of a grid_h x grid_w grid over a (B, C, H, W) map, (B, C, grid_h, grid_w).

    With ``normalize`` each pooled C-vector v becomes v / sqrt(|v|² + 1e-24) (a unit vector above
    a norm of ~1e-9), as the library normalises rows. Differentiable; the output has the input's dtype.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a (B, C, H, W) tensor; got {got}")
    if features.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton pool_patches takes float32, bfloat16 or float16 features; got "
                        f"{features.dtype}. Pool float64 maps with torch (F.avg_pool2d).")
    if features.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton pool_patches needs CUDA tensors (got {features.device.type}); "
                         "set TRITON_INTERPRET=1 to run it on the CPU")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool; got {type(normalize).__name__}")
    _, _, h, w = features.shape
    for name, cells, size, axis in (("grid_h", grid_h, h, "H"), ("grid_w", grid_w, w, "W")):
        if isinstance(cells, bool) or not isinstance(cells, int) or cells < 1:
            raise ValueError(f"{name} must be a positive int; got {cells!r}")
        if size % cells:
            raise ValueError(f"{name}={cells} must divide the map's {axis}={size} (cells of equal size)")
    if features.numel() == 0:
        raise ValueError(f"features must not be empty; got shape {tuple(features.shape)}")
    out, _ = pool_patches_triton(features, grid_h, grid_w, normalize)
    return out
