"""contrastkit.metrics against MONAI's own DiceMetric and HausdorffDistanceMetric(percentile=95).

MONAI is a test oracle only (CI does not install it). Masks are drawn to hit the cases where
conventions part: small masks, stray components, and classes empty in P, T or both.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from contrastkit.metrics import dice, hd95

pytest.importorskip("scipy")
monai_metrics = pytest.importorskip("monai.metrics")


def random_one_hot(rng: np.random.Generator, n: int, k: int, spatial: tuple[int, ...]) -> np.ndarray:
    """(N, K, *spatial) one-hot of label maps: per class a box (sometimes 1-2 voxels), stray voxels, or nothing."""
    labels = np.zeros((n, *spatial), np.int64)
    for i in range(n):
        for c in range(1, k):
            kind = rng.integers(4)
            if kind == 0:
                continue  # class absent from this image
            size = [int(rng.integers(1, 3)) if kind == 1 else int(rng.integers(2, max(3, s // 2))) for s in spatial]
            lo = [int(rng.integers(0, s - w + 1)) for s, w in zip(spatial, size, strict=True)]
            labels[(i, *(slice(a, a + w) for a, w in zip(lo, size, strict=True)))] = c
            if kind == 3:  # stray component(s) away from the box
                for _ in range(int(rng.integers(1, 4))):
                    labels[(i, *(int(rng.integers(0, s)) for s in spatial))] = c
    return np.moveaxis(np.eye(k, dtype=np.float32)[labels], -1, 1)


def monai_dice(pred, target, include_background, ignore_empty):
    metric = monai_metrics.DiceMetric(include_background=include_background, reduction="none",
                                      ignore_empty=ignore_empty)
    metric(torch.from_numpy(pred), torch.from_numpy(target))
    return metric.aggregate().double().numpy()


def monai_hd95(pred, target, include_background, spacing=None):
    metric = monai_metrics.HausdorffDistanceMetric(include_background=include_background, percentile=95,
                                                   reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on every empty mask, which these cases are made of
        metric(torch.from_numpy(pred), torch.from_numpy(target), spacing=spacing)
    return metric.aggregate().double().numpy()


CASES = [("NCHW", (16, 18), None, 0), ("NCHW", (9, 31), (0.7, 1.3), 1), ("NCDHW", (5, 9, 10), (3.0, 1.0, 0.8), 2)]


@pytest.mark.parametrize("layout,spatial,spacing,seed", CASES)
@pytest.mark.parametrize("include_background", [True, False])
def test_matches_monai(layout, spatial, spacing, seed, include_background):
    rng = np.random.default_rng(seed)
    pred, target = random_one_hot(rng, 6, 4, spatial), random_one_hot(rng, 6, 4, spatial)
    # the same masks with small perturbations: near-misses, where HD95 is small but non-zero
    near = target.copy()
    near[:, 1:, ...] *= rng.random(near[:, 1:].shape) < 0.9
    pred, target = np.concatenate([pred, near]), np.concatenate([target, target])
    kw = {"layout": layout, "include_background": include_background}

    ours = dice(pred, target, **kw)
    assert ours.shape == (12, 4 if include_background else 3)
    np.testing.assert_allclose(ours, monai_dice(pred, target, include_background, ignore_empty=False), rtol=1e-6)
    # MONAI's default ignore_empty=True: NaN exactly where T is empty, our value elsewhere
    ignored = monai_dice(pred, target, include_background, ignore_empty=True)
    channels = slice(0 if include_background else 1, None)
    t_empty = ~target[:, channels].reshape(*ours.shape, -1).any(-1)
    assert (np.isnan(ignored) == t_empty).all()
    np.testing.assert_allclose(ours[~t_empty], ignored[~t_empty], rtol=1e-6)

    expected = monai_hd95(pred, target, include_background, spacing)
    got = hd95(pred, target, spacing, convention="monai", **kw)
    assert np.isnan(expected).any() and (expected > 0).any()  # the draw covers empty masks and real distances
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_stray_component_monai_vs_medpy():
    """An 11x11 target and the same square plus a 2x2 blob across the image.

    The blob is 4 of the prediction's 44 surface voxels (9 %: inside its own directed 95th
    percentile) but 4 of 84 pooled distances (4.8 %: outside the pooled one), so MedPy's
    convention scores it 0 and MONAI's scores the blob's distance.
    """
    target = np.zeros((1, 1, 64, 64), np.float32)
    target[0, 0, 2:13, 2:13] = 1
    pred = target.copy()
    pred[0, 0, 58:60, 58:60] = 1
    expected = monai_hd95(pred, target, include_background=True)
    monai_style = hd95(pred, target, convention="monai", layout="NCHW")
    np.testing.assert_allclose(monai_style, expected, rtol=1e-5)
    # nearest target surface voxel to the blob's far corner (59, 59) is the square's corner (12, 12)
    assert expected[0, 0] > np.hypot(46, 46) - 1
    assert hd95(pred[0, 0], target[0, 0]) == 0.0
