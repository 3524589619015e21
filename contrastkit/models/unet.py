"""A compact 2D U-Net whose forward can also return its decoder features and a projection."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class UNetOutput(NamedTuple):
    logits: torch.Tensor  # (B, num_classes, H, W)
    features: torch.Tensor  # (B, base_width, H, W): the decoder's last feature map
    projection: torch.Tensor  # (B, proj_dim, H, W): projection head on ``features``


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # 8 groups, or fewer for narrow layers, so that every group count divides the width.
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(norm, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), _norm(norm, cout), nn.ReLU(inplace=True),
        )


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv = _DoubleConv(2 * cout, cout, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


class UNet(nn.Module):
    """U-Net: ``depth`` poolings, width ``base_width · 2^level``, 3×3 conv–norm–ReLU blocks.

    Args:
        in_channels: image channels.
        num_classes: output logit channels (1 for binary segmentation with a sigmoid).
        base_width: channels of the first level; level l has ``base_width · 2^l``.
        depth: number of 2× poolings; H and W must be multiples of ``2^depth``. Depth 0 is a
            plain convolutional block.
        proj_dim: output channels of the projection head (conv1×1–ReLU–conv1×1 on the
            decoder's last feature map).
        norm: ``"batch"`` or ``"group"`` normalisation.

    ``forward(x)`` returns the logits (B, num_classes, H, W); ``forward(x, return_features=True)``
    returns a :class:`UNetOutput` ``(logits, features, projection)``, all at full resolution.
    A patch is just a smaller image, so patches of any size divisible by ``2^depth`` work too.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        base_width: int = 32,
        depth: int = 4,
        proj_dim: int = 64,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("num_classes", num_classes)
        _positive_int("base_width", base_width)
        _positive_int("proj_dim", proj_dim)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative int; got {depth!r}")
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group'; got {norm!r}")
        self.in_channels, self.depth = in_channels, depth
        widths = [base_width * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList(
            [_DoubleConv(in_channels, widths[0], norm)]
            + [_DoubleConv(widths[level - 1], widths[level], norm) for level in range(1, depth + 1)]
        )
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            [_Up(widths[level], widths[level - 1], norm) for level in range(depth, 0, -1)]
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.projector = nn.Sequential(
            nn.Conv2d(widths[0], widths[0], 1), nn.ReLU(inplace=True), nn.Conv2d(widths[0], proj_dim, 1)
        )

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor; got {getattr(x, 'shape', type(x).__name__)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x has {x.shape[1]} channels but the UNet expects in_channels={self.in_channels}"
            )
        multiple = 2**self.depth
        h, w = x.shape[-2:]
        if h == 0 or w == 0 or h % multiple or w % multiple:
            raise ValueError(
                f"x's size (H, W) = ({h}, {w}) must be positive multiples of 2^depth = {multiple}"
            )
        skips = []
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up in self.up:
            x = up(x, skips.pop())
        logits = self.head(x)
        if not return_features:
            return logits
        return UNetOutput(logits, x, self.projector(x))
