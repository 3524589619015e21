"""Triton kernels of contrastkit, installed as ``contrastkit.kernels``.

A layer below the library: the kernels take tensors and flags and import nothing of contrastkit.
``contrastkit/_triton.py`` (the triton backend) adapts the core op's inputs and options to them.

- :func:`info_nce_rows`: the fused masked InfoNCE (forward and backward), used by
  ``contrastkit.info_nce(..., backend="triton")`` and by ``backend="auto"`` on CUDA.
- :func:`pool_patches`: the fused grid-cell mean (optionally L2-normalised) of a feature map.
- :data:`SHARED_GROUP`: the group id that matches every group (``contrastkit.SHARED``).

The kernels run on CUDA devices, or on the CPU through Triton's interpreter when
``TRITON_INTERPRET=1`` is set before triton is imported (slow; for tests). Triton itself is
imported only when a kernel is first used.
"""

from __future__ import annotations

import importlib.util

import torch

from ._layout import KERNEL_DTYPES, MAX_EMBEDDING_SIZE, interpreting
from ._plan import SHARED_GROUP

__all__ = ["KERNEL_DTYPES", "SHARED_GROUP", "available", "info_nce_rows", "pool_patches", "supports",
           "unavailable_reason"]

# Looked up once: info_nce asks on every call, and torch.compile cannot trace importlib.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def unavailable_reason() -> str | None:
    """None when the Triton backend can run, else a sentence saying why not."""
    if not _TRITON_INSTALLED:
        return "triton is not installed (pip install triton, Linux x86-64 with an NVIDIA GPU)"
    if not (torch.cuda.is_available() or interpreting()):
        return "no CUDA device is available (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
    return None


def available() -> bool:
    return unavailable_reason() is None


def supports(dtype: torch.dtype, embedding_size: int) -> bool:
    """Whether the kernels take embeddings of this dtype and size: bf16/fp16 up to D = 1024,
    fp32 up to D = 512, never float64."""
    return dtype in KERNEL_DTYPES and embedding_size <= MAX_EMBEDDING_SIZE[dtype]


def info_nce_rows(query, key, labels, key_labels, groups, key_groups, temperature, *, denominator: str,
                  normalize: bool, ignore_index: int, self_key_offset: int | None):
    from .info_nce import info_nce_rows as rows

    return rows(query, key, labels, key_labels, groups, key_groups, temperature, denominator=denominator,
                normalize=normalize, ignore_index=ignore_index, self_key_offset=self_key_offset)


info_nce_rows.__doc__ = "Fused per-row masked InfoNCE; see ``contrastkit.kernels.info_nce.info_nce_rows``."


def pool_patches(features, grid_h: int, grid_w: int, normalize: bool):
    from .pool import pool_patches as pool

    return pool(features, grid_h, grid_w, normalize)


pool_patches.__doc__ = "Fused grid-cell mean of a feature map; see ``contrastkit.kernels.pool.pool_patches``."
