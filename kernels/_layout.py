"""How the kernels address embeddings: (N, D) rows or (B, C, H, W) maps, through strides.

Row r of a feature map is pixel (b, h, w) with r = b*H*W + h*W + w, and its element d sits at
``b*sB + d*sC + h*sH + w*sW``. A 2-D (N, D) tensor is the special case H = W = 1, so one
addressing scheme serves both and no input is ever permuted or copied.
"""

from __future__ import annotations

import os

import torch

# Largest embedding size the kernels take: tiles hold whole rows (padded to a power of two) in
# shared memory, and float32 rows of 1024 need more than a Hopper GPU's 227 KiB even in 16 x 16
# tiles (tests/kernels/compile_for_gpu.py --table reports each shape's shared memory).
MAX_EMBEDDING_SIZE = {torch.float32: 512, torch.bfloat16: 1024, torch.float16: 1024}
KERNEL_DTYPES = tuple(MAX_EMBEDDING_SIZE)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def num_rows(x: torch.Tensor) -> int:
    return x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[2] * x.shape[3]


def embedding_size(x: torch.Tensor) -> int:
    return x.shape[1]


def layout(x: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(HW, W, sB, sD, sH, sW): the addressing arguments every kernel takes for a tensor."""
    if x.dim() == 2:
        return 1, 1, x.stride(0), x.stride(1), 0, 0
    _, _, h, w = x.shape
    return h * w, w, x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def padded_size(d: int) -> int:
    """Power of two >= max(d, 16): tl.dot needs every dimension >= 16."""
    return max(16, 1 << (d - 1).bit_length())


def check_kernel_input(name: str, x: torch.Tensor) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"backend='triton' takes float32, bfloat16 or float16 {name}; got {x.dtype}. "
            "Use backend='torch' (or 'reference') for float64."
        )
    if embedding_size(x) > MAX_EMBEDDING_SIZE[x.dtype]:
        raise ValueError(
            f"backend='triton' takes {x.dtype} embeddings of size D <= {MAX_EMBEDDING_SIZE[x.dtype]}; {name} has "
            f"D = {embedding_size(x)}. Use backend='torch' for larger D."
        )
