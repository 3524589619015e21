"""Metrics against hand-computed cases and an independent brute-force HD95."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from contrastkit.metrics import (
    aggregate,
    binary_metrics,
    dice,
    format_summary,
    hd95,
    iou,
    per_class_metrics,
    precision,
    recall,
)

pytest.importorskip("scipy")


def brute_force_hd95(p: np.ndarray, t: np.ndarray, spacing, directed_max: bool = False) -> float:
    """Surface = foreground voxel with a face neighbour outside the mask or the array; float64 pairwise.

    Pooled 95th percentile (MedPy), or with ``directed_max`` the larger directed one (MONAI).
    """

    def surface(m):
        pts = []
        for idx in zip(*np.nonzero(m), strict=True):
            for axis in range(m.ndim):
                for step in (-1, 1):
                    n = list(idx)
                    n[axis] += step
                    if not 0 <= n[axis] < m.shape[axis] or not m[tuple(n)]:
                        pts.append(idx)
                        break
                else:
                    continue
                break
        return np.array(pts, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)

    sp, st = surface(p), surface(t)
    d = np.sqrt(((sp[:, None, :] - st[None, :, :]) ** 2).sum(-1))
    if directed_max:
        return float(max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95)))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def hand_dice(p: np.ndarray, t: np.ndarray) -> float:
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else 2.0 * (p & t).sum() / total


def test_overlap_metrics_hand_computed():
    target = np.zeros((4, 5), bool)
    target[0:2, 0:3] = True  # 6 pixels
    pred = np.zeros((4, 5), bool)
    pred[1:3, 0:2] = True  # 4 pixels, 2 of them inside the target
    assert dice(pred, target) == pytest.approx(2 * 2 / (4 + 6))
    assert iou(pred, target) == pytest.approx(2 / 8)
    assert precision(pred, target) == pytest.approx(2 / 4)
    assert recall(pred, target) == pytest.approx(2 / 6)
    # torch tensors and 0/1 integers are accepted the same way
    assert dice(torch.from_numpy(pred).int(), torch.from_numpy(target).float()) == dice(pred, target)


def test_hd95_hand_computed_single_points():
    a, b = np.zeros((5, 5), bool), np.zeros((5, 5), bool)
    a[0, 0], b[0, 3] = True, True
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing=(1.0, 2.0)) == pytest.approx(6.0)
    assert hd95(a, a) == 0.0


def test_hd95_3d_anisotropic_hand_computed():
    a, b = np.zeros((3, 4, 4), bool), np.zeros((3, 4, 4), bool)
    a[0, 1, 1], b[1, 1, 3] = True, True
    spacing = (3.0, 1.0, 0.5)  # (z, y, x) as for ACDC volumes
    assert hd95(a, b, spacing) == pytest.approx(math.sqrt(3.0**2 + (2 * 0.5) ** 2))
    # a 3-slice slab against the same slab shifted by one slice
    c, d = np.zeros((6, 5, 5), bool), np.zeros((6, 5, 5), bool)
    c[1:4, 1:4, 1:4], d[2:5, 1:4, 1:4] = True, True
    assert hd95(c, d, spacing) == pytest.approx(brute_force_hd95(c, d, spacing))


@pytest.mark.parametrize(
    "shape,spacing", [((12, 14), (1.0, 1.0)), ((12, 14), (0.7, 1.9)), ((5, 8, 9), (4.0, 1.2, 0.8))]
)
def test_hd95_matches_brute_force(shape, spacing):
    rng = np.random.default_rng(sum(shape))
    for _ in range(3):
        p, t = rng.random(shape) < 0.3, rng.random(shape) < 0.3
        assert hd95(p, t, spacing) == pytest.approx(brute_force_hd95(p, t, spacing), rel=1e-9)


def test_empty_mask_conventions():
    empty, full = np.zeros((4, 6), bool), np.zeros((4, 6), bool)
    full[1, 2] = True
    both = binary_metrics(empty, empty)
    assert both == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "hd95": 0.0}
    diagonal = math.hypot(3 * 2.0, 5 * 0.5)
    for pred, target in ((empty, full), (full, empty)):
        one = binary_metrics(pred, target, spacing=(2.0, 0.5))
        assert one["dice"] == one["iou"] == one["precision"] == one["recall"] == 0.0
        assert one["hd95"] == pytest.approx(diagonal)
        assert math.isnan(hd95(pred, target, empty_hd95="nan"))


def test_per_class_3d_volume():
    target = np.zeros((2, 4, 4), np.int64)
    target[:, 0:2, 0:2] = 1
    target[:, 2:4, 2:4] = 2
    pred = target.copy()
    pred[0, 0, 0] = 2  # one voxel of class 1 predicted as class 2
    result = per_class_metrics(pred, target, num_classes=4, spacing=(5.0, 1.0, 1.0))
    assert list(result) == [1, 2, 3]
    assert result[1]["dice"] == pytest.approx(2 * 7 / (7 + 8))
    assert result[2]["precision"] == pytest.approx(8 / 9) and result[2]["recall"] == 1.0
    assert result[3] == {
        "dice": 1.0,
        "iou": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "hd95": 0.0,
    }  # absent class
    for c in (1, 2):
        assert result[c]["hd95"] == pytest.approx(brute_force_hd95(pred == c, target == c, (5.0, 1.0, 1.0)))
    assert 0 in per_class_metrics(pred, target, 4, include_background=True)


def test_aggregate_mean_std_and_nan_handling():
    results = [{"dice": 0.5, "hd95": 2.0}, {"dice": 1.0, "hd95": math.nan}, {"dice": 0.0, "hd95": 4.0}]
    summary = aggregate(results)
    assert summary["dice"] == {"mean": 0.5, "std": pytest.approx(np.std([0.5, 1.0, 0.0])), "n": 3, "n_nan": 0}
    assert summary["hd95"] == {"mean": 3.0, "std": 1.0, "n": 2, "n_nan": 1}
    nested = aggregate([{1: {"dice": 0.2}, 2: {"dice": 0.4}}, {1: {"dice": 0.6}, 2: {"dice": 0.8}}])
    assert nested[1]["dice"]["mean"] == pytest.approx(0.4) and nested[2]["dice"]["mean"] == pytest.approx(0.6)
    text = format_summary(nested)
    assert "class 1:" in text and "dice 0.4000 ± 0.2000 (n=2)" in text
    assert "1 NaN left out" in format_summary(summary)


def test_errors():
    a = np.zeros((3, 3))
    with pytest.raises(ValueError, match="same shape"):
        dice(a, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="binary"):
        dice(a + 0.5, a)
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, spacing=(1.0,))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, spacing=(1.0, -1.0))
    with pytest.raises(ValueError, match="empty_hd95"):
        hd95(a, a, empty_hd95="zero")
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        dice([[0, 1]], [[0, 1]])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        per_class_metrics(np.full((2, 2), 3), np.zeros((2, 2), np.int64), 3)
    with pytest.raises(TypeError, match="integer label map"):
        per_class_metrics(np.zeros((2, 2)), np.zeros((2, 2), np.int64), 3)
    with pytest.raises(ValueError, match="keys"):
        aggregate([{"dice": 1.0}, {"iou": 1.0}])
    with pytest.raises(ValueError, match="empty"):
        aggregate([])


def random_batch(seed: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """Masks of varied sizes, one image with an empty prediction and one with both empty."""
    rng = np.random.default_rng(seed)
    p = rng.random(shape) < rng.uniform(0.05, 0.5, (shape[0],) + (1,) * (len(shape) - 1))
    t = rng.random(shape) < rng.uniform(0.05, 0.5, (shape[0],) + (1,) * (len(shape) - 1))
    p[1] = False
    p[2], t[2] = False, False
    return p, t


def test_batched_nchw_is_per_image():
    """(N, 1, H, W) is N images, each scored on its own, not one 4-D volume (issue 24, point 4)."""
    p, t = random_batch(0, (5, 1, 9, 11))
    spacing = (0.8, 1.5)
    got = dice(p, t, layout="NCHW")
    assert got.shape == (5, 1)
    np.testing.assert_allclose(got[:, 0], [hand_dice(a[0], b[0]) for a, b in zip(p, t, strict=True)])
    pairs = list(zip(p[:, 0], t[:, 0], strict=True))
    for fn in (iou, precision, recall):
        np.testing.assert_array_equal(fn(p, t, layout="NCHW")[:, 0], [fn(a, b) for a, b in pairs])
    for convention, directed_max in (("medpy", False), ("monai", True)):
        got = hd95(p, t, spacing, layout="NCHW", convention=convention)[:, 0]
        for n in (0, 3, 4):
            assert got[n] == pytest.approx(brute_force_hd95(p[n, 0], t[n, 0], spacing, directed_max), rel=1e-9)
        if convention == "medpy":  # empty prediction: the grid diagonal
            assert got[1] == pytest.approx(math.hypot(8 * 0.8, 10 * 1.5)) and got[2] == 0.0
        else:
            assert math.isnan(got[1]) and math.isnan(got[2])
    per_image = binary_metrics(p, t, spacing, layout="NCHW")
    assert per_image == [binary_metrics(a[0], b[0], spacing) for a, b in zip(p, t, strict=True)]
    assert aggregate(per_image)["dice"]["mean"] == pytest.approx(np.mean([hand_dice(a, b) for a, b in pairs]))


def test_batched_ncdhw_is_per_volume():
    p, t = random_batch(1, (3, 1, 4, 6, 5))
    spacing = (3.0, 1.0, 0.7)
    got = hd95(p, t, spacing, layout="NCDHW")
    assert got.shape == (3, 1)
    assert got[0, 0] == pytest.approx(brute_force_hd95(p[0, 0], t[0, 0], spacing), rel=1e-9)
    assert got[2, 0] == 0.0  # both empty, MedPy convention


def test_one_hot_include_background():
    """One-hot (N, K, H, W): channel c is class c; include_background=False drops channel 0 only."""
    rng = np.random.default_rng(2)
    labels_p, labels_t = rng.integers(0, 3, (4, 8, 7)), rng.integers(0, 3, (4, 8, 7))
    one_hot_p = torch.nn.functional.one_hot(torch.from_numpy(labels_p), 3).permute(0, 3, 1, 2)
    one_hot_t = torch.nn.functional.one_hot(torch.from_numpy(labels_t), 3).permute(0, 3, 1, 2)
    pairs = list(zip(labels_p, labels_t, strict=True))
    expected = np.array([[hand_dice(a == c, b == c) for c in range(3)] for a, b in pairs])
    foreground = dice(one_hot_p, one_hot_t, layout="NCHW", include_background=False)
    np.testing.assert_allclose(foreground, expected[:, 1:])
    np.testing.assert_allclose(dice(one_hot_p, one_hot_t, layout="NCHW", include_background=True), expected)
    scores = binary_metrics(one_hot_p, one_hot_t, layout="NCHW", include_background=False)
    assert [list(s) for s in scores] == [[1, 2]] * 4
    assert scores[3][2]["dice"] == pytest.approx(expected[3, 2])
    # the same label maps as MONAI's (N, 1, H, W) integer maps
    rows = per_class_metrics(labels_p[:, None], labels_t[:, None], 3, layout="NCHW")
    assert rows == [per_class_metrics(a, b, 3) for a, b in zip(labels_p, labels_t, strict=True)]


def test_hd95_monai_convention_hand_computed():
    """Directed maximum: a 2x2 blob far from an 11x11 square is inside P's directed 95 % but not the pooled 95 %."""
    t = np.zeros((64, 64), bool)
    t[2:13, 2:13] = True
    p = t.copy()
    p[58:60, 58:60] = True
    assert hd95(p, t) == 0.0
    expected = brute_force_hd95(p, t, (1.0, 1.0), directed_max=True)
    assert expected > 60
    assert hd95(p, t, convention="monai") == pytest.approx(expected, rel=1e-9)
    assert hd95(t, p, convention="monai") == pytest.approx(expected, rel=1e-9)
    empty = np.zeros_like(t)
    assert math.isnan(hd95(empty, empty, convention="monai"))
    assert math.isnan(hd95(empty, t, convention="monai"))
    assert hd95(empty, t, convention="monai", empty_hd95="max") == pytest.approx(math.hypot(63, 63))


def test_layout_errors():
    batch = np.zeros((2, 1, 4, 4), bool)
    with pytest.raises(ValueError, match="layout must be given for 4-D"):
        dice(batch, batch)
    with pytest.raises(ValueError, match="layout must be given for 4-D"):
        hd95(batch, batch)
    with pytest.raises(ValueError, match="layout must be given for 4-D"):
        per_class_metrics(batch.astype(np.int64), batch.astype(np.int64), 2)
    assert dice(batch, batch, layout="image") == 1.0  # one 4-D image, said so explicitly
    with pytest.raises(ValueError, match=r"layout='NCDHW' expects 5-D"):
        dice(batch, batch, layout="NCDHW")
    with pytest.raises(ValueError, match="layout must be None or one of"):
        dice(batch, batch, layout="NHWC")
    one_hot = np.zeros((2, 3, 4, 4), bool)
    with pytest.raises(ValueError, match="include_background must be True or False for one-hot input with 3"):
        dice(one_hot, one_hot, layout="NCHW")
    with pytest.raises(ValueError, match="include_background applies to batched one-hot input only"):
        dice(batch[0, 0], batch[0, 0], include_background=False)
    with pytest.raises(ValueError, match="convention must be one of"):
        hd95(batch[0, 0], batch[0, 0], convention="scipy")
    with pytest.raises(ValueError, match="spacing must give one value per dimension \\(2\\)"):
        hd95(batch, batch, (1.0, 1.0, 1.0, 1.0), layout="NCHW")
    with pytest.raises(ValueError, match="one channel"):
        per_class_metrics(one_hot.astype(np.int64), one_hot.astype(np.int64), 2, layout="NCHW")
