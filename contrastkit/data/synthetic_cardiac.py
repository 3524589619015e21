"""SyntheticCardiac: procedural short-axis "cardiac MRI" with ACDC's four classes, no download needed.

Each volume is a stack of slices from base to apex. A slice shows a dark myocardial ring (class 2)
around a bright LV blood pool (class 3), with the RV (class 1) as a bright crescent hugging the ring
on one side, inside a grey body with a few bright distractor blobs (background, class 0). The image
gets a Gaussian blur, a smooth multiplicative bias field, a global gain and Gaussian noise, clipped to
0..1. Geometry and intensities are drawn once per volume and vary smoothly along the stack (the heart
shrinks towards the apex, the RV faster); noise is drawn per slice. Everything is seeded by
(seed, volume, slice), so any slice can be produced alone and in any order.

The datasets mirror the ACDC ones: ``SyntheticCardiac`` ~ ``ACDCSlices`` (slice names
``case003_slice_5``, one volume per patient, so ``split_by_patient`` selects by volume) and
``SyntheticCardiacVolumes`` ~ ``ACDCVolumes``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .acdc import NamedSlices

MIN_SIZE = 32


def _check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def _volume_params(seed: int, volume: int, size: int) -> dict:
    rng = np.random.default_rng([seed, volume])
    center = size / 2 + rng.normal(0.0, 0.04 * size, 2)
    return {
        "center": center,
        "drift": rng.uniform(-0.04, 0.04, 2) * size,  # center shift from base to apex
        "lv_axes": size * rng.uniform(0.11, 0.15) * np.array([1.0, rng.uniform(0.8, 1.0)]),
        "angle": rng.uniform(0.0, np.pi),
        "thickness": size * rng.uniform(0.045, 0.065),
        "rv_direction": np.pi + rng.normal(0.0, 0.35),  # image left, as in radiological view
        "rv_axes": np.array([rng.uniform(1.05, 1.35), rng.uniform(0.55, 0.75)]),  # x outer myo radius
        "body_center": size / 2 + rng.normal(0.0, 0.03 * size, 2),
        "body_axes": size * np.array([rng.uniform(0.40, 0.46), rng.uniform(0.33, 0.40)]),
        "blobs": [
            (size * rng.uniform(0.2, 0.8, 2), size * rng.uniform(0.03, 0.07), rng.uniform(0.45, 0.9))
            for _ in range(rng.integers(2, 5))
        ],
        "intensity": {
            "body": rng.uniform(0.25, 0.35),
            "myo": rng.uniform(0.08, 0.18),
            "lv": rng.uniform(0.75, 0.95),
            "rv": rng.uniform(0.6, 0.85),
        },
        "blur": rng.uniform(0.6, 1.2),
        "bias": rng.normal(0.0, 0.3, 3),
        "noise": rng.uniform(0.02, 0.05),
    }


def _inside_ellipse(yy, xx, center, axes, angle: float) -> np.ndarray:
    dy, dx = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    u, w = c * dx + s * dy, -s * dx + c * dy
    return (u / axes[0]) ** 2 + (w / axes[1]) ** 2 <= 1.0


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        padded = np.pad(image, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="reflect")
        n = image.shape[axis]
        image = sum(t * np.take(padded, np.arange(k, k + n), axis=axis) for k, t in enumerate(taps))
    return image


def synthetic_cardiac_slice(
    volume: int, index: int, slices_per_volume: int, size: int = 128, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Slice ``index`` (0 = base) of synthetic volume ``volume``: (image (S, S) float32 in 0..1,
    label (S, S) int64 in 0..3: 0 background, 1 RV, 2 myocardium, 3 LV)."""
    size = _check_count(size, "size", MIN_SIZE)
    slices_per_volume = _check_count(slices_per_volume, "slices_per_volume")
    if not 0 <= index < slices_per_volume:
        raise ValueError(f"index must be in [0, {slices_per_volume}); got {index}")
    p = _volume_params(seed, volume, size)
    depth = index / max(slices_per_volume - 1, 1)  # 0 at the base, 1 at the apex
    shrink = 1.0 - 0.55 * depth**1.5
    center = p["center"] + depth * p["drift"]
    lv_axes = p["lv_axes"] * shrink
    thickness = max(2.5, p["thickness"] * (0.7 + 0.3 * shrink))  # keeps the ring closed at small sizes
    outer_axes = lv_axes + thickness
    rv_axes = p["rv_axes"] * outer_axes[0] * (1.0 - 0.25 * depth)  # tapers faster than the ring
    direction = np.array([np.sin(p["rv_direction"]), np.cos(p["rv_direction"])])
    offset = p["rv_direction"] - p["angle"]  # the RV overlaps the ring's edge, so it hugs the ring
    ring_radius = 1.0 / np.hypot(np.cos(offset) / outer_axes[0], np.sin(offset) / outer_axes[1])
    rv_center = center + direction * (ring_radius + 0.3 * rv_axes[1])

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    lv = _inside_ellipse(yy, xx, center, lv_axes, p["angle"])
    outer = _inside_ellipse(yy, xx, center, outer_axes, p["angle"])
    rv = _inside_ellipse(yy, xx, rv_center, rv_axes, p["rv_direction"] + np.pi / 2) & ~outer
    label = np.zeros((size, size), dtype=np.int64)
    label[rv] = 1
    label[outer & ~lv] = 2
    label[lv] = 3

    level = p["intensity"]
    image = np.where(_inside_ellipse(yy, xx, p["body_center"], p["body_axes"], 0.0), level["body"], 0.0)
    for blob_center, radius, value in p["blobs"]:
        image[_inside_ellipse(yy, xx, blob_center, (radius * shrink,) * 2, 0.0)] = value
    image[label == 1] = level["rv"]
    image[label == 2] = level["myo"]
    image[label == 3] = level["lv"]

    rng = np.random.default_rng([seed, volume, index + 1])
    image = _gaussian_blur(image, p["blur"])
    ny, nx = yy / size - 0.5, xx / size - 0.5
    bias = p["bias"] + rng.normal(0.0, 0.03, 3)
    image = image * np.exp(bias[0] * nx + bias[1] * ny + bias[2] * nx * ny) * rng.uniform(0.9, 1.1)
    image = image + rng.normal(0.0, p["noise"], image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), label


def _slice_names(n_volumes: int, slices_per_volume: int) -> list[str]:
    return [f"case{v:03d}_slice_{k}" for v in range(n_volumes) for k in range(slices_per_volume)]


class SyntheticCardiac(NamedSlices):
    """Slices of ``n_volumes`` synthetic volumes: item i is (image (1, S, S) float32, label (S, S) int64).

    ``names`` restricts the set (e.g. one side of ``split_by_patient(ds.names, 3)``); slices are named
    ``case<v>_slice_<k>`` and each volume is its own patient. ``transform(image, label)`` as in ACDCSlices.
    """

    def __init__(
        self,
        n_volumes: int = 20,
        slices_per_volume: int = 8,
        size: int = 128,
        seed: int = 0,
        names: Sequence[str] | None = None,
        transform: Callable | None = None,
    ):
        self.n_volumes = _check_count(n_volumes, "n_volumes")
        self.slices_per_volume = _check_count(slices_per_volume, "slices_per_volume")
        self.size = _check_count(size, "size", MIN_SIZE)
        self.seed = int(seed)
        self.transform = transform
        all_names = _slice_names(self.n_volumes, self.slices_per_volume)
        if names is None:
            self.names = all_names
        else:
            if isinstance(names, str):
                raise TypeError("names must be a sequence of slice names; got a str")
            self.names = list(names)
            unknown = sorted(set(self.names) - set(all_names))
            if unknown:
                raise ValueError(f"names not in this synthetic set: {unknown[:5]}")
        position = {n: divmod(i, self.slices_per_volume) for i, n in enumerate(all_names)}
        self._positions = [position[n] for n in self.names]

    def __getitem__(self, index: int):
        volume, k = self._positions[index]
        image, label = synthetic_cardiac_slice(volume, k, self.slices_per_volume, self.size, self.seed)
        image, label = torch.from_numpy(image)[None], torch.from_numpy(label)
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label


class SyntheticCardiacVolumes(Sequence):
    """Whole synthetic volumes for 3D evaluation: item i is (name, image (Z, S, S) float32,
    label (Z, S, S) int64), both numpy, as ACDCVolumes. Use another ``seed`` than the training set."""

    def __init__(self, n_volumes: int = 8, slices_per_volume: int = 8, size: int = 128, seed: int = 1):
        self.n_volumes = _check_count(n_volumes, "n_volumes")
        self.slices_per_volume = _check_count(slices_per_volume, "slices_per_volume")
        self.size = _check_count(size, "size", MIN_SIZE)
        self.seed = int(seed)
        self.names = [f"case{v:03d}" for v in range(self.n_volumes)]

    @property
    def patient_ids(self) -> list[str]:
        return list(self.names)

    def __len__(self) -> int:
        return self.n_volumes

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        volume = range(self.n_volumes)[index]
        pairs = [
            synthetic_cardiac_slice(volume, k, self.slices_per_volume, self.size, self.seed)
            for k in range(self.slices_per_volume)
        ]
        return self.names[volume], np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
