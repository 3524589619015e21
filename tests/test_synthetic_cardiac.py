"""SyntheticCardiac: determinism, shapes, classes, topology, smooth volumes, ACDC-like interfaces."""

import numpy as np
import pytest
import torch

from contrastkit.data.acdc import predict_volume, split_by_patient
from contrastkit.data.synthetic_cardiac import (
    SyntheticCardiac,
    SyntheticCardiacVolumes,
    synthetic_cardiac_slice,
)

BACKGROUND, RV, MYO, LV = range(4)


def _neighbours(mask):
    """Pixels 4-adjacent to mask (on a zero-padded grid)."""
    p = np.pad(mask, 1)
    return (p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]) & ~mask


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_deterministic_and_order_free():
    a = SyntheticCardiacVolumes(3, 5, size=64, seed=7)
    b = SyntheticCardiacVolumes(3, 5, size=64, seed=7)
    for (na, ia, la), (nb, ib, lb) in zip(a, b, strict=True):
        assert na == nb
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
    # a slice alone, the dataset item and the volume slice are the same sample
    name, image, label = a[2]
    alone = synthetic_cardiac_slice(2, 3, 5, size=64, seed=7)
    np.testing.assert_array_equal(alone[0], image[3])
    np.testing.assert_array_equal(alone[1], label[3])
    ds = SyntheticCardiac(3, 5, size=64, seed=7)
    item_image, item_label = ds[ds.names.index("case002_slice_3")]
    np.testing.assert_array_equal(item_image[0].numpy(), image[3])
    np.testing.assert_array_equal(item_label.numpy(), label[3])
    other = SyntheticCardiacVolumes(3, 5, size=64, seed=8)[2]
    assert not np.array_equal(other[1], image)
    assert not np.array_equal(a[1][1], image)  # volumes differ from each other


def test_shapes_dtypes_and_ranges():
    ds = SyntheticCardiac(2, 4, size=48, seed=0)
    assert len(ds) == 8
    image, label = ds[5]
    assert image.shape == (1, 48, 48) and image.dtype == torch.float32
    assert label.shape == (48, 48) and label.dtype == torch.int64
    assert 0 <= image.min() and image.max() <= 1
    volumes = SyntheticCardiacVolumes(2, 6, size=48)
    assert len(volumes) == 2 and volumes.names == ["case000", "case001"]
    name, image, label = volumes[-1]
    assert name == "case001" and image.shape == label.shape == (6, 48, 48)
    assert image.dtype == np.float32 and label.dtype == np.int64
    assert set(np.unique(label)) <= {0, 1, 2, 3}
    assert [v[0] for v in volumes[:1]] == ["case000"]


@pytest.mark.parametrize("size", [48, 128])
def test_all_classes_and_cardiac_topology(size):
    for name, image, label in SyntheticCardiacVolumes(6, 6, size=size, seed=3):
        for k in range(label.shape[0]):
            lab = label[k]
            assert set(np.unique(lab)) == {0, 1, 2, 3}, (name, k)
            lv, myo, rv = lab == LV, lab == MYO, lab == RV
            # the LV cavity is enclosed by the myocardium: its 4-neighbours are myocardium only,
            # so no path from the border (or the RV) reaches it without crossing the ring
            assert set(np.unique(lab[_neighbours(lv)])) == {MYO}, (name, k)
            assert not lv[[0, -1]].any() and not lv[:, [0, -1]].any()
            # the RV lies beside the ring and hugs it
            assert (lab[_neighbours(rv)] == MYO).any(), (name, k)
            assert rv.sum() > 0 and myo.sum() > 0
            # blood pools are bright, the myocardium is dark (tiny apical pools blur into the ring)
            for pool in (lv, rv):
                if pool.sum() >= 40:
                    assert image[k][pool].mean() > image[k][myo].mean() + 0.2, (name, k)


def test_neighbouring_slices_vary_smoothly():
    for _, _, label in SyntheticCardiacVolumes(4, 8, size=96, seed=5):
        lv_area = (label == LV).sum(axis=(1, 2))
        assert (np.diff(lv_area) < 0).all()  # the heart shrinks towards the apex
        assert lv_area[-1] < 0.6 * lv_area[0]
        centers = np.array([np.argwhere(lab == LV).mean(axis=0) for lab in label])
        assert np.abs(np.diff(centers, axis=0)).max() < 0.02 * 96  # no jumps between slices
        for k in range(7):
            for c in (RV, MYO, LV):
                assert _dice(label[k] == c, label[k + 1] == c) > 0.5


def test_labeled_selection_by_volume():
    ds = SyntheticCardiac(6, 4, size=32, seed=0)
    assert ds.patient_ids == ds.volume_ids == [f"case{v:03d}" for v in range(6) for _ in range(4)]
    labeled, unlabeled = split_by_patient(ds.names, 2, seed=1)
    volumes = {n.split("_slice_")[0] for n in labeled}
    assert len(volumes) == 2 and len(labeled) == 8
    assert volumes.isdisjoint(n.split("_slice_")[0] for n in unlabeled)
    sub = SyntheticCardiac(6, 4, size=32, seed=0, names=labeled)
    assert len(sub) == 8 and sub.names == labeled
    full = dict(zip(ds.names, range(len(ds)), strict=True))
    for i in (0, 7):
        assert torch.equal(sub[i][1], ds[full[labeled[i]]][1])


def test_transform_and_volume_prediction():
    ds = SyntheticCardiac(1, 2, size=32, transform=lambda x, y: (1 - x, y * 0))
    image, label = ds[0]
    raw = synthetic_cardiac_slice(0, 0, 2, size=32)[0]
    np.testing.assert_allclose(image[0].numpy(), 1 - raw)
    assert (label == 0).all()
    # an oracle model that looks up the true labels gives them back through predict_volume
    name, image, label = SyntheticCardiacVolumes(1, 3, size=32)[0]
    oracle = torch.nn.functional.one_hot(torch.from_numpy(label), 4).permute(0, 3, 1, 2).float()
    calls = iter(oracle.split(2))
    pred = predict_volume(lambda batch: next(calls), image, size=32, batch_size=2)
    np.testing.assert_array_equal(pred, label)


def test_bad_arguments():
    with pytest.raises(ValueError, match="size must be >= 32"):
        SyntheticCardiac(2, 2, size=16)
    with pytest.raises(ValueError, match="n_volumes"):
        SyntheticCardiacVolumes(0, 2)
    with pytest.raises(TypeError, match="slices_per_volume"):
        SyntheticCardiac(2, 2.0)
    with pytest.raises(TypeError, match="n_volumes"):
        SyntheticCardiac(True, 2)
    with pytest.raises(ValueError, match="case009_slice_0"):
        SyntheticCardiac(2, 2, names=["case009_slice_0"])
    with pytest.raises(TypeError, match="names"):
        SyntheticCardiac(2, 2, names="case000_slice_0")
    with pytest.raises(ValueError, match="index"):
        synthetic_cardiac_slice(0, 3, 3)
