"""Paired image/mask augmentation on batches, built on kornia.augmentation."""

from __future__ import annotations

import torch
from torch import nn

from .._optional import require


def _check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1]; got {value!r}")
    return float(value)


class PairedAugment(nn.Module):
    """Random geometric transforms applied identically to images and masks, jitter on images only.

    Works on batches (each sample draws its own parameters) on any device:
    ``image, mask = aug(image, mask)`` with image (B, C, H, W) float and mask (B, 1, H, W)
    (or (B, K, H, W)) float; ``mask=None`` transforms the image alone.

    Geometric (image and mask): horizontal and vertical flips (each with ``p_flip``); with
    probability ``p_rot90`` a rotation by 0, 90, 180 or 270 degrees (uniform; square inputs
    only, as a quarter turn does not map a non-square canvas onto itself); and, when
    ``degrees``, ``translate`` or ``scale`` is set, a small random affine transform with
    probability ``p_affine``. Images are resampled bilinearly, masks with nearest neighbour,
    so a binary mask stays binary; areas moved in from outside the canvas are filled with 0
    (background in the mask).

    Intensity (image only): ``kornia.augmentation.ColorJiggle`` with ``brightness``,
    ``contrast``, ``saturation``, ``hue`` (``p_jitter``; saturation and hue need 3 channels).

    Randomness comes from torch's global generator (kornia has no generator argument):
    call ``torch.manual_seed`` for reproducible augmentation.
    """

    def __init__(
        self,
        *,
        p_flip: float = 0.5,
        p_rot90: float = 0.5,
        degrees: float = 0.0,
        translate: float = 0.0,
        scale: tuple[float, float] | None = None,
        p_affine: float = 0.5,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        hue: float = 0.0,
        p_jitter: float = 0.8,
    ) -> None:
        super().__init__()
        augmentation = require("kornia.augmentation", "PairedAugment")
        p_flip, p_rot90, p_affine, p_jitter = (
            _check_probability(n, v)
            for n, v in (
                ("p_flip", p_flip),
                ("p_rot90", p_rot90),
                ("p_affine", p_affine),
                ("p_jitter", p_jitter),
            )
        )
        for name, value in (
            ("degrees", degrees),
            ("translate", translate),
            ("brightness", brightness),
            ("contrast", contrast),
            ("saturation", saturation),
            ("hue", hue),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number; got {value!r}")
        if translate > 1 or hue > 0.5:
            raise ValueError(f"translate must be <= 1 and hue <= 0.5; got translate={translate}, hue={hue}")
        if scale is not None and (len(scale) != 2 or not 0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must be None or (low, high) with 0 < low <= high; got {scale!r}")
        self.rot90 = p_rot90 > 0
        geometric = []
        if p_flip > 0:
            geometric += [
                augmentation.RandomHorizontalFlip(p=p_flip),
                augmentation.RandomVerticalFlip(p=p_flip),
            ]
        if self.rot90:
            # kornia draws `times` uniformly from the range and rounds it: (-1.5, 2.5) gives each
            # quarter-turn count -1, 0, 1, 2 (= 270, 0, 90, 180 degrees) with probability 1/4.
            geometric.append(augmentation.RandomRotation90(times=(-1.5, 2.5), p=p_rot90))
        if degrees or translate or scale is not None:
            geometric.append(
                augmentation.RandomAffine(
                    degrees=float(degrees),
                    translate=(translate, translate) if translate else None,
                    scale=tuple(scale) if scale is not None else None,
                    p=p_affine,
                )
            )
        self.jitter = (
            augmentation.ColorJiggle(brightness, contrast, saturation, hue, p=p_jitter)
            if brightness or contrast or saturation or hue
            else None
        )
        self.geometric = (
            augmentation.AugmentationSequential(*geometric, data_keys=["input", "mask"])
            if geometric
            else None
        )

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None):
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or not image.is_floating_point():
            raise ValueError(
                f"image must be a float (B, C, H, W) tensor; got {getattr(image, 'shape', image)!r}"
            )
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
                raise ValueError(f"mask must be a (B, K, H, W) tensor; got {getattr(mask, 'shape', mask)!r}")
            if mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
                raise ValueError(
                    f"mask (B, K, H, W) = {tuple(mask.shape)} must match image {tuple(image.shape)} "
                    "in B, H and W"
                )
        if self.rot90 and image.shape[-2] != image.shape[-1]:
            raise ValueError(
                f"rot90 needs square images; got H, W = {tuple(image.shape[-2:])} (set p_rot90=0)"
            )
        if self.geometric is not None:
            if mask is None:
                image = self.geometric(image, data_keys=["input"])
            else:
                mask_dtype = mask.dtype
                image, mask = self.geometric(image, mask.float())
                mask = mask.to(mask_dtype)
        if self.jitter is not None:
            image = self.jitter(image)
        return image if mask is None else (image, mask)
