"""ACDC reader on tiny generated HDF5 files in the SSL4MIS layout, plus a real-data check."""

import sys

import numpy as np
import pytest
import torch

from contrastkit.data.acdc import (
    ACDCSlices,
    ACDCVolumes,
    _read_h5,
    acdc_patient_split,
    find_acdc_root,
    fit_size,
    patient_id,
    predict_volume,
    read_list,
    restore_size,
    split_by_patient,
    volume_id,
)

TRAIN = {
    "patient001": (3, 20, 14),
    "patient002": (2, 18, 22),
    "patient003": (4, 16, 16),
    "patient004": (2, 24, 12),
}
VAL = {"patient005": (3, 12, 10)}
TEST = {"patient006": (2, 14, 18)}


def _case(rng, shape):
    label = rng.integers(0, 4, shape).astype(np.uint8)
    image = rng.random(shape).astype(np.float32)
    return image, label


def _write(path, image, label):
    h5py = pytest.importorskip("h5py", reason="the tiny ACDC files need h5py (contrastkit[examples])")
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=label)


@pytest.fixture
def tiny_acdc(tmp_path):
    """Four training patients as slices, one val and one test patient as volumes, two frames each."""
    rng = np.random.default_rng(0)
    root = tmp_path / "acdc"
    (root / "data" / "slices").mkdir(parents=True)
    truth, slice_names = {}, []
    for patient, (z, h, w) in TRAIN.items():
        for frame in ("frame01", "frame02"):
            for k in range(z):
                name = f"{patient}_{frame}_slice_{k}"
                truth[name] = _case(rng, (h, w))
                _write(root / "data" / "slices" / f"{name}.h5", *truth[name])
                slice_names.append(name)
    for cases in (VAL, TEST):
        for patient, shape in cases.items():
            for frame in ("frame01", "frame02"):
                truth[f"{patient}_{frame}"] = _case(rng, shape)
                _write(root / "data" / f"{patient}_{frame}.h5", *truth[f"{patient}_{frame}"])
    order = list(rng.permutation(slice_names))  # the real list is grouped by patient in a shuffled order
    order.sort(key=lambda n: ["patient003", "patient001", "patient004", "patient002"].index(patient_id(n)))
    (root / "train_slices.list").write_text("\n".join(order) + "\n\n")
    (root / "train.list").write_text("".join(f"{p}_{f}\n" for p in TRAIN for f in ("frame01", "frame02")))
    (root / "val.list").write_text("patient005_frame01.h5\npatient005_frame02.h5\n")  # extension is stripped
    (root / "test.list").write_text("patient006_frame01\npatient006_frame02")
    return root, truth, order


# ----------------------------------------------------------------------------- independent numpy resampling


def _np_nearest_exact(x, out_h, out_w):
    h, w = x.shape[-2:]
    rows = np.minimum(np.floor((np.arange(out_h) + 0.5) * h / out_h).astype(int), h - 1)
    cols = np.minimum(np.floor((np.arange(out_w) + 0.5) * w / out_w).astype(int), w - 1)
    return x[..., rows[:, None], cols[None, :]]


def _np_bilinear_axis(n, out):
    src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, src - lo


def _np_bilinear(x, out_h, out_w):
    x = x.astype(np.float64)
    lo, hi, t = _np_bilinear_axis(x.shape[0], out_h)
    x = x[lo] * (1 - t)[:, None] + x[hi] * t[:, None]
    lo, hi, t = _np_bilinear_axis(x.shape[1], out_w)
    return x[:, lo] * (1 - t) + x[:, hi] * t


def _np_pad(x, size):
    h, w = x.shape
    out = np.zeros((size, size), dtype=x.dtype)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = x
    return out


# ----------------------------------------------------------------------------- lists, names, root


def test_read_list_strips_extensions_and_blank_lines(tiny_acdc):
    root, _, order = tiny_acdc
    assert read_list(root, "train_slices") == order
    assert read_list(root, "val") == ["patient005_frame01", "patient005_frame02"]
    assert read_list(root, "test") == ["patient006_frame01", "patient006_frame02"]
    with pytest.raises(FileNotFoundError, match="split='nope'"):
        read_list(root, "nope")
    with pytest.raises(FileNotFoundError, match="not an ACDC folder"):
        read_list(root / "data" / "slices", "train")
    with pytest.raises(TypeError, match="root"):
        read_list(3, "train")


def test_patient_and_volume_ids():
    assert patient_id("patient001_frame01_slice_3") == "patient001"
    assert patient_id("patient001_frame12") == "patient001"
    assert volume_id("patient001_frame01_slice_13") == "patient001_frame01"
    assert volume_id("patient001_frame01") == "patient001_frame01"
    assert patient_id("case007_slice_2") == volume_id("case007_slice_2") == "case007"


def test_find_acdc_root_from_env(tiny_acdc, tmp_path, monkeypatch):
    root, _, _ = tiny_acdc
    monkeypatch.setenv("CONTRASTKIT_DATA", str(root.parent))
    assert find_acdc_root() == root
    monkeypatch.setenv("CONTRASTKIT_DATA", str(root))
    assert find_acdc_root() == root
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("CONTRASTKIT_DATA", str(tmp_path / "empty"))
    assert find_acdc_root() is None
    # a variable that names no folder is a configuration error, not a silent skip
    monkeypatch.setenv("CONTRASTKIT_DATA", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="CONTRASTKIT_DATA"):
        find_acdc_root()


def test_missing_h5py_names_the_extra(tiny_acdc, monkeypatch):
    root, _, order = tiny_acdc
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r"contrastkit\[examples\]"):
        _read_h5(root / "data" / "slices" / f"{order[0]}.h5")


# ----------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("mode", ["resize", "pad"])
def test_slices_match_written_files(tiny_acdc, mode):
    root, truth, order = tiny_acdc
    ds = ACDCSlices(root, size=32, mode=mode)
    assert len(ds) == len(order) and ds.names == order
    assert ds.patient_ids == [n.split("_")[0] for n in order]
    assert ds.volume_ids == [n.rsplit("_slice_", 1)[0] for n in order]
    for i in (0, 5, len(ds) - 1):
        image, label = ds[i]
        assert image.shape == (1, 32, 32) and image.dtype == torch.float32
        assert label.shape == (32, 32) and label.dtype == torch.int64
        raw_image, raw_label = truth[order[i]]
        if mode == "pad":
            want_image, want_label = _np_pad(raw_image, 32), _np_pad(raw_label, 32)
        else:
            want_image, want_label = _np_bilinear(raw_image, 32, 32), _np_nearest_exact(raw_label, 32, 32)
        np.testing.assert_allclose(image[0].numpy(), want_image, atol=1e-5)
        np.testing.assert_array_equal(label.numpy(), want_label)


def test_slices_subset_and_transform(tiny_acdc):
    root, truth, _ = tiny_acdc
    names = ["patient002_frame02_slice_1.h5", "patient004_frame01_slice_0"]
    ds = ACDCSlices(root, names, size=24, mode="pad", transform=lambda x, y: (x * 2, y + 10))
    assert ds.names == ["patient002_frame02_slice_1", "patient004_frame01_slice_0"]
    image, label = ds[1]
    np.testing.assert_allclose(image[0].numpy(), 2 * _np_pad(truth[ds.names[1]][0], 24))
    assert label.min() == 10
    with pytest.raises(FileNotFoundError, match="1 slice file"):
        ACDCSlices(root, ["patient009_frame01_slice_0"])
    with pytest.raises(TypeError, match="names"):
        ACDCSlices(root, "patient001_frame01_slice_0")
    with pytest.raises(ValueError, match="mode"):
        ACDCSlices(root, mode="crop")
    with pytest.raises(ValueError, match="size"):
        ACDCSlices(root, size=0)


def test_volumes_match_written_files(tiny_acdc):
    root, truth, _ = tiny_acdc
    for split, cases in (("val", VAL), ("test", TEST)):
        volumes = ACDCVolumes(root, split)
        assert len(volumes) == 2 * len(cases)
        assert volumes.patient_ids == [p for p in cases for _ in range(2)]
        for name, image, label in volumes:
            assert image.dtype == np.float32 and label.dtype == np.int64
            np.testing.assert_array_equal(image, truth[name][0])
            np.testing.assert_array_equal(label, truth[name][1])
    assert [v[0] for v in ACDCVolumes(root, "val")[::-1]] == ["patient005_frame02", "patient005_frame01"]
    with pytest.raises(FileNotFoundError, match="volume"):
        ACDCVolumes(root, "train")  # training cases exist only as slices here


# ----------------------------------------------------------------------------- labeled selection by patient


def _check_partition(names, labeled, unlabeled):
    assert sorted(labeled + unlabeled) == sorted(names)
    assert [n for n in names if n in set(labeled)] == labeled  # order of the list is kept
    lab_patients = {patient_id(n) for n in labeled}
    assert lab_patients.isdisjoint(patient_id(n) for n in unlabeled)
    for p in lab_patients:  # every slice of both frames of a labeled patient is labeled
        assert {n for n in names if patient_id(n) == p} <= set(labeled)
        assert {volume_id(n) for n in labeled if patient_id(n) == p} == {f"{p}_frame01", f"{p}_frame02"}
    return lab_patients


@pytest.mark.parametrize("n_labeled", [1, 2, 3])
def test_patient_split_is_patient_disjoint_and_seeded(tiny_acdc, n_labeled):
    root, _, order = tiny_acdc
    labeled, unlabeled = acdc_patient_split(root, n_labeled, seed=3)
    assert len(_check_partition(order, labeled, unlabeled)) == n_labeled
    assert acdc_patient_split(root, n_labeled, seed=3) == (labeled, unlabeled)
    draws = {frozenset(map(patient_id, acdc_patient_split(root, n_labeled, seed=s)[0])) for s in range(12)}
    assert len(draws) > 1  # the seed matters


def test_patient_split_list_order_and_explicit(tiny_acdc):
    root, _, order = tiny_acdc
    labeled, unlabeled = acdc_patient_split(root, 2, seed=None)  # SSL4MIS: first patients of the list
    assert _check_partition(order, labeled, unlabeled) == {"patient003", "patient001"}
    assert labeled == order[: len(labeled)]
    labeled, unlabeled = acdc_patient_split(root, patients=["patient004", "patient002"])
    assert _check_partition(order, labeled, unlabeled) == {"patient004", "patient002"}
    explicit = split_by_patient(order, patients=["patient004"])
    assert acdc_patient_split(root, 1, patients=["patient004"]) == explicit


def test_patient_split_errors(tiny_acdc):
    root, _, order = tiny_acdc
    with pytest.raises(ValueError, match="n_labeled must be in \\[1, 4\\]"):
        acdc_patient_split(root, 5)
    with pytest.raises(ValueError, match="n_labeled must be in"):
        acdc_patient_split(root, 0)
    with pytest.raises(TypeError, match="n_labeled"):
        acdc_patient_split(root, 1.5)
    with pytest.raises(ValueError, match="give n_labeled"):
        acdc_patient_split(root)
    with pytest.raises(ValueError, match="patient009"):
        acdc_patient_split(root, patients=["patient009"])
    with pytest.raises(TypeError, match="patients"):
        acdc_patient_split(root, patients="patient001")
    with pytest.raises(ValueError, match="disagrees"):
        acdc_patient_split(root, 2, patients=["patient001"])


# ----------------------------------------------------------------------------- fixed size and back


def test_pad_round_trip_is_exact():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 4, (3, 13, 20)).astype(np.uint8)
    image = rng.random((13, 20)).astype(np.float32)
    padded = fit_size(label, 32, "pad")
    assert isinstance(padded, np.ndarray) and padded.dtype == np.uint8 and padded.shape == (3, 32, 32)
    np.testing.assert_array_equal(padded[1], _np_pad(label[1], 32))
    np.testing.assert_array_equal(restore_size(padded, (13, 20), "pad"), label)
    t = torch.from_numpy(image)
    back = restore_size(fit_size(t, 32, "pad"), (13, 20), "pad")
    assert isinstance(back, torch.Tensor) and torch.equal(back, t)


def test_pad_mode_crops_oversized_axes():
    label = np.arange(40 * 10).reshape(40, 10) % 4 + 1
    fitted = fit_size(label, 32, "pad")
    np.testing.assert_array_equal(fitted[:, 11:21], label[4:36])  # rows center-cropped, cols center-padded
    assert (fitted[:, :11] == 0).all() and (fitted[:, 21:] == 0).all()
    back = restore_size(fitted, (40, 10), "pad")
    np.testing.assert_array_equal(back[4:36], label[4:36])
    assert (back[:4] == 0).all() and (back[36:] == 0).all()  # cropped rows cannot come back


def test_resize_round_trip():
    rng = np.random.default_rng(2)
    # integer factors: nearest-exact up and down is the identity
    label = rng.integers(0, 4, (2, 16, 8))
    np.testing.assert_array_equal(restore_size(fit_size(label, 64), (16, 8)), label)
    # ACDC-like blocky label (256x216 -> 256): shape and classes survive, nearly every pixel too
    label = np.kron(rng.integers(0, 4, (16, 12)), np.ones((16, 18), dtype=np.int64))
    up = fit_size(label, 256)
    np.testing.assert_array_equal(up, _np_nearest_exact(label, 256, 256))
    back = restore_size(up, label.shape)
    assert back.shape == label.shape and set(np.unique(back)) == set(np.unique(label))
    assert (back == label).mean() > 0.99
    np.testing.assert_allclose(np.bincount(back.ravel()), np.bincount(label.ravel()), rtol=0.02)
    # float maps (logits) are restored bilinearly
    logits = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    back = restore_size(logits, (20, 26))
    np.testing.assert_allclose(back[1, 3].numpy(), _np_bilinear(logits[1, 3].numpy(), 20, 26), atol=1e-12)


def test_fit_and_restore_errors():
    x = torch.zeros(8, 8)
    with pytest.raises(ValueError, match="mode"):
        fit_size(x, 16, "stretch")
    with pytest.raises(TypeError, match="size"):
        fit_size(x, True)
    with pytest.raises(TypeError, match="x must be a numpy array or torch.Tensor"):
        fit_size([[0.0]], 16)
    with pytest.raises(ValueError, match="at least 2 dims"):
        fit_size(torch.zeros(8), 16)
    with pytest.raises(ValueError, match="original_hw"):
        restore_size(x, (8,))
    with pytest.raises(ValueError, match="size must be positive"):
        restore_size(x, (0, 8))


# ----------------------------------------------------------------------------- volume prediction


def _class_from_intensity(batch):
    """A 'model' that reads the class off the intensity (image = label / 3): logits -(3x - c)^2."""
    classes = torch.arange(4, dtype=batch.dtype, device=batch.device).view(1, 4, 1, 1)
    return -((3 * batch - classes) ** 2)


@pytest.mark.parametrize("as_numpy", [True, False])
def test_predict_volume_recovers_labels(as_numpy):
    rng = np.random.default_rng(3)
    label = np.kron(rng.integers(0, 4, (5, 6, 5)), np.ones((1, 4, 4), dtype=np.int64))  # (5, 24, 20)
    image = (label / 3).astype(np.float32)
    seen = []

    def model_fn(batch):
        seen.append(tuple(batch.shape))
        return _class_from_intensity(batch)

    volume = image if as_numpy else torch.from_numpy(image)
    pred = predict_volume(model_fn, volume, size=32, mode="pad", batch_size=2)
    assert isinstance(pred, np.ndarray) == as_numpy
    assert seen == [(2, 1, 32, 32), (2, 1, 32, 32), (1, 1, 32, 32)]
    np.testing.assert_array_equal(np.asarray(pred), label)  # pad mode is lossless
    pred = predict_volume(_class_from_intensity, image, size=48, mode="resize", batch_size=4)
    assert pred.shape == label.shape and pred.dtype == np.int64
    assert (pred == label).mean() > 0.97  # only block edges blur


def test_predict_volume_takes_several_channels():
    rng = np.random.default_rng(4)
    label = np.kron(rng.integers(0, 4, (3, 5, 4)), np.ones((1, 3, 3), dtype=np.int64))  # (3, 15, 12)
    image = np.stack([rng.random(label.shape), label / 3], 1).astype(np.float32)  # (Z, 2, H, W): noise, signal
    seen = []

    def model_fn(batch):
        seen.append(tuple(batch.shape))
        return _class_from_intensity(batch[:, 1:])

    pred = predict_volume(model_fn, image, size=16, mode="pad", batch_size=2)
    assert seen == [(2, 2, 16, 16), (1, 2, 16, 16)]
    np.testing.assert_array_equal(pred, label)
    with pytest.raises(ValueError, match="Z, M, H, W"):
        predict_volume(model_fn, image[None], size=16)


def test_predict_volume_errors():
    image = np.zeros((2, 10, 10), dtype=np.float32)
    with pytest.raises(ValueError, match=r"logits \(B, C, 16, 16\)"):
        predict_volume(lambda b: b[:, 0], image, size=16)
    with pytest.raises(ValueError, match=r"logits \(B, C, 16, 16\)"):
        predict_volume(lambda b: torch.zeros(b.shape[0], 4, 8, 8), image, size=16)
    with pytest.raises(ValueError, match="Z, H, W"):
        predict_volume(_class_from_intensity, image[0], size=16)
    with pytest.raises(ValueError, match="batch_size"):
        predict_volume(_class_from_intensity, image, size=16, batch_size=0)
    with pytest.raises(TypeError, match="model_fn"):
        predict_volume(None, image)


# ----------------------------------------------------------------------------- the real data set


def test_real_acdc_counts_and_ranges():
    root = find_acdc_root()
    if root is None:
        pytest.skip("ACDC not found: set CONTRASTKIT_DATA or provide <repo>/../shared/data/acdc")
    pytest.importorskip("h5py", reason="reading ACDC needs h5py (contrastkit[examples])")
    slices = ACDCSlices(root)
    assert len(slices) == 1312 and len(set(slices.patient_ids)) == 70 and len(set(slices.volume_ids)) == 140
    val, test = ACDCVolumes(root, "val"), ACDCVolumes(root, "test")
    assert (len(val), len(test)) == (20, 40)
    assert set(val.patient_ids).isdisjoint(test.patient_ids)
    assert set(slices.patient_ids).isdisjoint(val.patient_ids + test.patient_ids)
    for i in (0, 700, 1311):
        raw_image, raw_label = _read_h5(slices._paths[i])
        assert raw_image.ndim == 2 and raw_image.min() >= 0 and raw_image.max() <= 1
        assert set(np.unique(raw_label)) <= {0, 1, 2, 3}
        image, label = slices[i]
        assert image.shape == (1, 256, 256) and label.shape == (256, 256)
    name, image, label = test[0]
    assert image.ndim == 3 and image.shape == label.shape and image.dtype == np.float32
    assert 0 <= image.min() and image.max() <= 1 and set(np.unique(label)) == {0, 1, 2, 3}
    # the SSL4MIS protocol labels the first 32 / 68 / 136 slices for 1 / 3 / 7 patients
    for n, count in ((1, 32), (3, 68), (7, 136)):
        labeled, unlabeled = acdc_patient_split(root, n, seed=None)
        assert labeled == slices.names[:count] and len(unlabeled) == 1312 - count
    labeled, unlabeled = acdc_patient_split(root, 7, seed=0)
    assert len({patient_id(n) for n in labeled}) == 7
    assert {patient_id(n) for n in labeled}.isdisjoint(patient_id(n) for n in unlabeled)
