"""Cutting images into a grid of patches, and pooling feature maps onto that grid."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from einops import rearrange

from ._backends import resolve_backend
from ._validation import check_flag


def _is_int(g) -> bool:
    # numbers.Integral also admits numpy integers (e.g. a grid read from a config array).
    return isinstance(g, numbers.Integral) and not isinstance(g, (bool, np.bool_))


def as_grid(grid) -> tuple[int, int]:
    """An int or a pair of positive ints -> (rows, cols)."""
    if isinstance(grid, (bool, np.bool_)):
        raise TypeError("grid must be an int or a pair of ints; got bool")
    if _is_int(grid):
        grid = (grid, grid)
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(_is_int(g) for g in grid):
        raise TypeError(f"grid must be an int or a pair of ints; got {grid!r}")
    if grid[0] < 1 or grid[1] < 1:
        raise ValueError(f"grid must be positive; got {tuple(grid)}")
    return int(grid[0]), int(grid[1])


def _check_map(name: str, x, grid: tuple[int, int]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be (B, C, H, W); got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h == 0 or w == 0:
        # 0 is divisible by any grid, so without this an empty map would pass silently.
        raise ValueError(f"{name} has an empty spatial size (H, W) = ({h}, {w})")
    if h % grid[0] or w % grid[1]:
        raise ValueError(
            f"grid {grid} must divide the size of {name} (H, W) = ({h}, {w}); "
            f"resize or crop to a multiple of the grid"
        )


def patchify(x: torch.Tensor, grid) -> torch.Tensor:
    """(B, C, H, W) -> (B*gh*gw, C, H/gh, W/gw); patches of one image are consecutive, row-major."""
    gh, gw = as_grid(grid)
    _check_map("x", x, (gh, gw))
    return rearrange(x, "b c (gh ph) (gw pw) -> (b gh gw) c ph pw", gh=gh, gw=gw)


def unpatchify(patches: torch.Tensor, grid) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B*gh*gw, C, ph, pw) -> (B, C, gh*ph, gw*pw)."""
    gh, gw = as_grid(grid)
    if not isinstance(patches, torch.Tensor):
        raise TypeError(f"patches must be a torch.Tensor; got {type(patches).__name__}")
    if patches.dim() != 4:
        raise ValueError(f"patches must be (B*gh*gw, C, ph, pw); got shape {tuple(patches.shape)}")
    if patches.shape[0] % (gh * gw):
        raise ValueError(
            f"patches holds {patches.shape[0]} patches, "
            f"not a multiple of the grid's {gh}x{gw}={gh * gw} cells"
        )
    return rearrange(patches, "(b gh gw) c ph pw -> b c (gh ph) (gw pw)", gh=gh, gw=gw)


def pool_patches(features: torch.Tensor, grid, normalize: bool = False, backend: str = "auto") -> torch.Tensor:
    """(B, C, H, W) -> (B, C, gh, gw): the mean over each grid cell, L2-normalised over C if asked.

    ``backend`` as for :func:`contrastkit.info_nce`: ``"auto"`` runs the fused Triton kernel on
    CUDA maps of a kernel dtype and torch otherwise (``"reference"`` is the torch form too).
    """
    gh, gw = as_grid(grid)
    _check_map("features", features, (gh, gw))
    if not features.is_floating_point():
        raise TypeError(f"features must have a floating dtype; got {features.dtype}")
    check_flag("normalize", normalize)
    return resolve_backend(backend, features, features.shape[1], "pool_patches").pool_patches(
        features, gh, gw, normalize)
