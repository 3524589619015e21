"""Procedural polyp-like segmentation data: low-contrast textured blobs on textured backgrounds."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset


@lru_cache(maxsize=8)
def _squared_frequencies(size: int) -> np.ndarray:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    return fy**2 + fx**2


def _gaussian_filter(x: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic Gaussian blur over the last two axes (via FFT; sigma in pixels)."""
    size = x.shape[-1]
    kernel = np.exp(-2.0 * np.pi**2 * sigma**2 * _squared_frequencies(size))
    return np.fft.irfft2(np.fft.rfft2(x) * kernel, s=(size, size))


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, rescaled to zero mean and unit standard deviation."""
    field = _gaussian_filter(rng.standard_normal((size, size)), sigma)
    return (field - field.mean()) / (field.std() + 1e-12)


def _blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int, radius: float):
    """Signed depth of a random star-shaped blob: > 0 inside, in pixels, and the blob's radius map."""
    margin = 0.1 * size
    cy, cx = rng.uniform(margin, size - margin, 2)
    tilt = rng.uniform(0, np.pi)
    stretch = rng.uniform(0.65, 1.0)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(tilt) + dy * np.sin(tilt)
    v = (-dx * np.sin(tilt) + dy * np.cos(tilt)) / stretch
    dist, angle = np.hypot(u, v), np.arctan2(v, u)
    boundary = np.ones_like(dist)
    for k in range(2, 6):
        boundary += rng.uniform(0, 0.25 / k) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    boundary *= radius
    return boundary - dist, boundary


class SyntheticPolyps(Dataset):
    """``n`` procedurally generated RGB images with binary lesion masks; needs no files.

    Sample ``i`` comes from its own generator ``numpy.random.Generator(PCG64((seed, i)))``:
    it is the same every time, on every machine, whatever else is generated (for the NumPy
    version it was made with; NumPy may change its float algorithms between major versions).

    Each image has a smooth pinkish background with a coarse and a fine texture, uneven
    lighting (vignetting) and small specular highlights; one lesion (two in 20% of images)
    whose boundary is a perturbed, stretched, rotated ellipse with a radius log-uniform in
    [5%, 28%] of the image side, so small lesions are common; the lesion differs from the
    background only by a small colour shift, a dome-shaped shading and a finer texture,
    with a soft edge. Half the images also carry a lesion-coloured *distractor* patch
    (flat, without the lesion's texture or shading) that is not in the mask. Finally the
    image is blurred and gets Gaussian noise. The foreground fraction per image ranges from
    about 0.5% to 35% (5th/50th/95th percentiles near 0.8%, 4%, 18%; mean about 6%).

    Item ``i`` is ``(image, mask)`` like :class:`~contrastkit.data.SegmentationFolder`:
    image float32 (3, size, size) in [0, 1], mask float32 (1, size, size) in {0, 1}.
    Generating one 128x128 sample takes a few milliseconds.
    """

    def __init__(self, n: int, size: int = 128, seed: int = 0, *, transform: Callable | None = None) -> None:
        for name, value, minimum in (("n", n, 1), ("size", size, 16), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
        self.n, self.size, self.seed, self.transform = n, size, seed, transform

    def __len__(self) -> int:
        return self.n

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` as arrays: image float32 (3, S, S) in [0, 1], mask bool (S, S)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.n:
            raise IndexError(f"index must be an int in [0, {self.n}); got {index!r}")
        rng = np.random.Generator(np.random.PCG64([self.seed, int(index)]))
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)

        base = np.array([0.72, 0.42, 0.38]) + rng.normal(0, 0.04, 3)
        tint = np.array([1.0, 0.8, 0.7])[:, None, None]
        texture = 0.6 * _smooth_noise(rng, s, s / 16) + 0.4 * _smooth_noise(rng, s, s / 48)
        image = base[:, None, None] + rng.uniform(0.03, 0.08) * texture * tint

        mask = np.zeros((s, s), dtype=bool)
        shift_direction = np.array([1.0, -0.4, -0.2]) * rng.choice([-1.0, 1.0])
        lesion_texture = _smooth_noise(rng, s, s / 110)
        for _ in range(2 if rng.random() < 0.2 else 1):
            radius = s * np.exp(rng.uniform(np.log(0.05), np.log(0.28)))
            depth, boundary = _blob(rng, yy, xx, s, radius)
            mask |= depth > 0
            alpha = np.clip(depth / rng.uniform(1.0, 3.0) + 0.5, 0.0, 1.0)
            dome = np.clip(depth / boundary, 0.0, 1.0)
            shift = rng.uniform(0.03, 0.10) * shift_direction + rng.normal(0, 0.01, 3)
            lesion = (
                shift[:, None, None]
                + rng.uniform(0.0, 0.10) * dome
                + rng.uniform(0.015, 0.045) * lesion_texture * tint
            )
            image += alpha * lesion
        if rng.random() < 0.5:
            depth, _ = _blob(rng, yy, xx, s, s * rng.uniform(0.05, 0.2))
            alpha = np.clip(depth / 2.0 + 0.5, 0.0, 1.0)
            image += alpha * (rng.uniform(0.02, 0.06) * shift_direction)[:, None, None]

        for _ in range(rng.poisson(3)):
            cy, cx = rng.uniform(0, s, 2)
            spot = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(0.5, 1.5) ** 2))
            image += rng.uniform(0.2, 0.5) * spot
        centre_distance = np.hypot(yy - s / 2, xx - s / 2) / (s / np.sqrt(2))
        image *= 1.0 - rng.uniform(0.15, 0.45) * centre_distance**2
        image = _gaussian_filter(image, rng.uniform(0.3, 1.2))
        image += rng.normal(0, rng.uniform(0.01, 0.04), image.shape)
        return np.clip(image, 0.0, 1.0).astype(np.float32), mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.generate(index)
        image_t = torch.from_numpy(image)
        mask_t = torch.from_numpy(mask).unsqueeze(0).float()
        if self.transform is not None:
            image_t, mask_t = self.transform(image_t, mask_t)
        return image_t, mask_t

    def __repr__(self) -> str:
        return f"SyntheticPolyps(n={self.n}, size={self.size}, seed={self.seed})"
