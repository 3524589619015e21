"""NIfTI readers (official ACDC, MSD Task05 Prostate) on tiny files written with nibabel, plus real-data checks."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from contrastkit.data import (
    NiftiSlices,
    NiftiVolumes,
    detect_layout,
    find_acdc_root,
    fit_size,
    nifti_patient_split,
    nifti_slice_names,
    nifti_split,
    patient_id,
    predict_volume,
    shared_data_root,
    split_by_patient,
    synthetic_cardiac_slice,
)
from contrastkit.data import nifti as nifti_module
from contrastkit.metrics import hd95

nib = pytest.importorskip("nibabel", reason="the tiny NIfTI files need nibabel (contrastkit[examples])")

# depth and voxel size (x, y, z) in mm per case; x != y so that a swapped order shows
ACDC = {f"patient{i:03d}": (3 + i % 3, (1.40 + 0.01 * i, 1.60 + 0.02 * i, 5.0 + i)) for i in range(1, 7)}
ACDC_FRAMES = ("frame01", "frame09")  # ED and ES, as numbered in the official files
PROSTATE = {f"prostate_{i:02d}": (2 + i % 3, (0.60 + 0.01 * i, 0.65, 3.0 + 0.2 * i)) for i in (0, 1, 2, 4, 6, 7)}
H, W = 41, 37  # odd in-plane size: NIfTI (X, Y) = (37, 41)


def _affine(spacing, angle=0.4):
    """A rotated, shifted voxel-to-world map whose column norms (the header's zooms) are ``spacing``."""
    c, s = np.cos(angle), np.sin(angle)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag(spacing)
    affine[:3, 3] = (-12.0, 30.5, 4.0)
    return affine


def _save(path, data_xyz, spacing):
    nib.save(nib.Nifti1Image(data_xyz, _affine(spacing)), str(path))


def _to_nifti(volume_zhw):
    """The inverse of the readers' convention: (Z, H, W) -> NIfTI (X, Y, Z) = (W, H, Z)."""
    return np.ascontiguousarray(np.moveaxis(volume_zhw, 0, -1).swapaxes(0, 1))


def _minmax(x):
    x = x.astype(np.float64)
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


def _heart(volume, depth):
    """Synthetic hearts in the h5 convention (RV on the image left), cropped to an odd (Z, 41, 37)."""
    pairs = [synthetic_cardiac_slice(volume, k, depth, size=48, seed=5) for k in range(depth)]
    crop = (slice(None), slice(3, 3 + H), slice(5, 5 + W))
    return np.stack([p[0] for p in pairs])[crop], np.stack([p[1] for p in pairs])[crop]


def write_acdc(root):
    """Official layout under root/training; returns {volume: (expected image, label, spacing (z, h, w))}."""
    truth = {}
    for i, (patient, (depth, spacing)) in enumerate(ACDC.items()):
        folder = root / "training" / patient
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text("ED: 1\nES: 9\nGroup: NOR\nHeight: 180\nNbFrame: 20\nWeight: 75\n")
        for j, frame in enumerate(ACDC_FRAMES):
            image, label = _heart(2 * i + j, depth)
            raw = np.round(image * 700 + 40 + 13 * i).astype(np.int16)  # scanner units, not 0..1
            name = f"{patient}_{frame}"
            _save(folder / f"{name}.nii.gz", _to_nifti(raw), spacing)
            _save(folder / f"{name}_gt.nii.gz", _to_nifti(label.astype(np.uint8)), spacing)
            truth[name] = (_minmax(raw), label, spacing[::-1])
        _save(folder / f"{patient}_4d.nii.gz", np.zeros((W, H, depth, 2), np.int16), spacing)
        (folder / f"._{patient}_frame01.nii.gz").write_bytes(b"\0\5\26\7 macOS junk")
    return truth


def write_prostate(root):
    """MSD Task05 layout; returns {case: (expected T2, expected ADC, label, spacing (z, h, w))}."""
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    truth = {}
    for i, (case, (depth, spacing)) in enumerate(PROSTATE.items()):
        image, heart = _heart(20 + i, depth)
        label = np.select([heart == 2, heart == 3], [1, 2], 0)  # a ring (PZ) around a core (TZ)
        t2, adc = image * 900 + 20, (1 - image) * 2000 + 100 + 50 * i
        _save(root / "imagesTr" / f"{case}.nii.gz", np.stack([_to_nifti(t2), _to_nifti(adc)], -1).astype(np.float32),
              spacing)
        _save(root / "labelsTr" / f"{case}.nii.gz", _to_nifti(label.astype(np.uint8)), spacing)
        truth[case] = (_minmax(t2), _minmax(adc), label, spacing[::-1])
    _save(root / "imagesTs" / "prostate_03.nii.gz", np.zeros((W, H, 2, 2), np.float32), (0.6, 0.6, 3.0))
    (root / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"\0\5\26\7 macOS junk")
    (root / "dataset.json").write_text(json.dumps({
        "name": "PROSTATE", "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"}, "numTraining": len(PROSTATE),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in PROSTATE]}))
    return truth


@pytest.fixture
def acdc(tmp_path):
    root = tmp_path / "ACDC"
    return root, write_acdc(root)


@pytest.fixture
def prostate(tmp_path):
    root = tmp_path / "Task05_Prostate"
    return root, write_prostate(root)


# ----------------------------------------------------------------------------- layouts


def test_detect_layout_on_each_layout_and_a_wrong_folder(acdc, prostate, tmp_path):
    assert detect_layout(acdc[0]) == "acdc-nifti"
    assert detect_layout(acdc[0] / "training") == "acdc-nifti"  # a folder of patient folders, e.g. testing/
    assert detect_layout(prostate[0]) == "msd-prostate"
    h5 = tmp_path / "h5"
    (h5 / "data" / "slices").mkdir(parents=True)
    (h5 / "train_slices.list").write_text("patient001_frame01_slice_0\n")
    assert detect_layout(h5) == "acdc-h5"
    if find_acdc_root() is not None:
        assert detect_layout(find_acdc_root()) == "acdc-h5"
    wrong = tmp_path / "kvasir"
    (wrong / "images").mkdir(parents=True)
    (wrong / "patient001").mkdir()
    (wrong / "patient001" / "patient001_4d.nii.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="none of the known") as err:
        detect_layout(wrong)
    for expected in ("acdc-h5", "acdc-nifti", "msd-prostate", "imagesTr/", "training/patientXXX"):
        assert expected in str(err.value)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        detect_layout(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="root"):
        detect_layout(3)
    with pytest.raises(ValueError, match="ACDCSlices / ACDCVolumes"):
        NiftiVolumes(h5)


# ----------------------------------------------------------------------------- values, orientation, spacing


def test_acdc_volumes_values_spacing_and_names(acdc):
    root, truth = acdc
    volumes = NiftiVolumes(root, "all")
    assert volumes.names == sorted(truth) and volumes.layout == "acdc-nifti"
    assert volumes.class_names == ("background", "RV", "myocardium", "LV")
    assert volumes.patient_ids == [patient_id(n) for n in sorted(truth)]
    for i, (name, image, label) in enumerate(volumes):
        want_image, want_label, want_spacing = truth[name]
        assert image.dtype == np.float32 and label.dtype == np.int64
        assert image.shape == label.shape == want_label.shape  # (Z, H, W) like the h5 copy
        np.testing.assert_allclose(image, want_image, atol=1e-6)  # min-max over the volume
        assert image.min() == 0 and image.max() == 1
        np.testing.assert_array_equal(label, want_label)
        assert volumes.spacings[i] == pytest.approx(want_spacing, rel=1e-6)  # (z, h, w) mm, not (x, y, z)
    assert set(np.unique(label)) == {0, 1, 2, 3}


def test_orientation_is_the_reversed_nifti_index_order(tmp_path):
    """A marker at NIfTI voxel (x, y, z) lands at [z, y, x]: rows are the file's Y, columns its X, as in the h5
    copy (patient001_frame01: official 216 x 256 x 10, h5 (10, 256, 216)); the affine's rotation is ignored."""
    folder = tmp_path / "training" / "patient007"
    folder.mkdir(parents=True)
    x, y, z = np.meshgrid(np.arange(5), np.arange(7), np.arange(3), indexing="ij")  # NIfTI (X=5, Y=7, Z=3)
    image = (x + 10 * y + 100 * z).astype(np.float32)
    label = np.zeros((5, 7, 3), np.uint8)
    label[1, 4, 2] = 3
    _save(folder / "patient007_frame01.nii.gz", image, (1.5, 1.25, 10.0))
    _save(folder / "patient007_frame01_gt.nii.gz", label, (1.5, 1.25, 10.0))
    volumes = NiftiVolumes(tmp_path, "all")
    _, got_image, got_label = volumes[0]
    assert got_image.shape == (3, 7, 5)
    assert np.argwhere(got_label).tolist() == [[2, 4, 1]]
    np.testing.assert_allclose(got_image * image.max(), image.transpose(2, 1, 0), rtol=1e-6)
    assert got_image[0, 0, 1] > got_image[0, 0, 0]  # columns follow X ...
    assert got_image[0, 1, 0] > got_image[0, 0, 4]  # ... rows follow Y
    assert volumes.spacings == [pytest.approx((10.0, 1.25, 1.5))]


def test_synthetic_hearts_survive_the_round_trip_in_h5_orientation(acdc):
    """Arrays written the way the official files store them come back exactly as the h5 convention holds them:
    the RV (class 1) stays on the image left of the LV (class 3), as in the real h5 copy."""
    root, truth = acdc
    _, image, label = NiftiVolumes(root, names=["patient002_frame01"])[0]
    np.testing.assert_array_equal(label, truth["patient002_frame01"][1])
    middle = label[len(label) // 2]
    assert np.argwhere(middle == 1)[:, 1].mean() < np.argwhere(middle == 3)[:, 1].mean()


def test_prostate_modalities_normalisation_and_labels(prostate):
    root, truth = prostate
    t2, adc, both = (NiftiVolumes(root, "all", modality=m) for m in (None, "ADC", "both"))
    assert t2.names == sorted(truth) and t2.class_names == ("background", "PZ", "TZ")  # no "._" junk, no imagesTs
    for i, case in enumerate(t2.names):
        want_t2, want_adc, want_label, want_spacing = truth[case]
        _, image, label = t2[i]
        np.testing.assert_allclose(image, want_t2, atol=1e-6)
        np.testing.assert_allclose(adc[i][1], want_adc, atol=1e-6)
        name, stacked, same_label = both[i]
        assert name == case and stacked.shape == (len(label), 2, H, W) and stacked.dtype == np.float32
        np.testing.assert_allclose(stacked[:, 0], want_t2, atol=1e-6)
        np.testing.assert_allclose(stacked[:, 1], want_adc, atol=1e-6)
        for channel in (stacked[:, 0], stacked[:, 1]):  # each modality normalised on its own
            assert channel.min() == 0 and channel.max() == 1
        np.testing.assert_array_equal(label, want_label)
        np.testing.assert_array_equal(same_label, want_label)
        assert t2.spacings[i] == pytest.approx(want_spacing, rel=1e-6)
    assert set(np.unique(label)) == {0, 1, 2}
    with pytest.raises(ValueError, match="modality must be one of"):
        NiftiVolumes(root, modality="DWI")


def test_acdc_refuses_a_modality(acdc):
    with pytest.raises(ValueError, match="modality must be None"):
        NiftiSlices(acdc[0], modality="T2")


# ----------------------------------------------------------------------------- slices


def test_slices_match_the_volumes(acdc, monkeypatch):
    root, truth = acdc
    train = nifti_split(root)["train"]
    names = nifti_slice_names(root)
    assert names == [f"{v}_slice_{k}" for v in train for k in range(len(truth[v][1]))]
    reads = []
    read_case = nifti_module._read_case
    monkeypatch.setattr(nifti_module, "_read_case", lambda case, *a: reads.append(case.name) or read_case(case, *a))
    flips = lambda image, label: (image.flip(-1), label.flip(-1))  # noqa: E731
    slices = NiftiSlices(root, size=32, mode="pad", transform=flips)
    assert slices.names == names and reads == []  # reading waits for the first item
    assert slices.volume_ids == [n.rsplit("_slice_", 1)[0] for n in names]
    for i, name in enumerate(names):
        volume, k = name.rsplit("_slice_", 1)
        image, label = slices[i]
        assert image.shape == (1, 32, 32) and image.dtype == torch.float32 and label.dtype == torch.int64
        want = fit_size(truth[volume][0][int(k)], 32, "pad"), fit_size(truth[volume][1][int(k)], 32, "pad")
        np.testing.assert_allclose(image[0].flip(-1).numpy(), want[0], atol=1e-6)
        np.testing.assert_array_equal(label.flip(-1).numpy(), want[1])
    assert reads == train  # each volume read once, in order
    reads.clear()
    bounded = NiftiSlices(root, [names[0], names[-1], names[1]], size=32, cache_volumes=1)
    for i in (0, 1, 2, 0):
        bounded[i]
    assert reads == [train[0], train[-1], train[0]]  # the last item found its volume still kept
    assert len(bounded._cache) == 1


def test_prostate_slices_with_both_modalities(prostate):
    root, truth = prostate
    labeled, _ = nifti_patient_split(root, 1, seed=0)
    slices = NiftiSlices(root, labeled, size=24, modality="both")
    image, label = slices[0]
    case, k = labeled[0].rsplit("_slice_", 1)
    assert image.shape == (2, 24, 24) and label.shape == (24, 24)
    np.testing.assert_allclose(image[1].numpy(), fit_size(truth[case][1][int(k)], 24), atol=1e-6)
    assert set(slices.patient_ids) == {case}


# ----------------------------------------------------------------------------- splits


def _touch_acdc(root, n):
    """Empty files are enough for the split: it reads file names, not headers."""
    for i in range(1, n + 1):
        folder = root / "training" / f"patient{i:03d}"
        folder.mkdir(parents=True)
        for frame in (1, 12):
            for suffix in ("", "_gt"):
                (folder / f"patient{i:03d}_frame{frame:02d}{suffix}.nii.gz").write_bytes(b"")


def test_split_is_by_patient_seeded_and_70_10_20(tmp_path):
    _touch_acdc(tmp_path, 100)
    parts = nifti_split(tmp_path)
    assert parts == nifti_split(tmp_path, seed=0)  # deterministic
    patients = {k: {patient_id(n) for n in v} for k, v in parts.items()}
    assert [len(patients[k]) for k in ("train", "val", "test")] == [70, 10, 20]
    assert [len(parts[k]) for k in ("train", "val", "test")] == [140, 20, 40]  # both frames of each patient
    assert set.union(*patients.values()) == {f"patient{i:03d}" for i in range(1, 101)}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    assert all(parts[k] == sorted(parts[k]) for k in parts)
    assert nifti_split(tmp_path, seed=1) != parts
    smaller = nifti_split(tmp_path, val=0.2, test=0.1)
    assert [len(smaller[k]) for k in ("train", "val", "test")] == [140, 40, 20]


def test_split_follows_ssl4mis_lists_by_patient(tmp_path):
    _touch_acdc(tmp_path, 6)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.list").write_text("patient004_frame01\npatient004_frame02\npatient001_frame01\n")
    (lists / "val.list").write_text("patient002_frame01.h5\n")
    (lists / "test.list").write_text("patient006_frame02\n")
    parts = nifti_split(tmp_path, lists=lists)  # h5 frames 01/02 are the official frames 01/12
    assert parts == {"train": ["patient001_frame01", "patient001_frame12", "patient004_frame01", "patient004_frame12"],
                     "val": ["patient002_frame01", "patient002_frame12"],
                     "test": ["patient006_frame01", "patient006_frame12"]}
    for part in ("train", "val", "test"):  # lists inside the root are used by default
        (tmp_path / f"{part}.list").write_text((lists / f"{part}.list").read_text())
    assert nifti_split(tmp_path) == parts
    (lists / "test.list").write_text("patient099_frame01\n")
    with pytest.raises(ValueError, match="patient099"):
        nifti_split(tmp_path, lists=lists)
    (lists / "val.list").unlink()
    with pytest.raises(FileNotFoundError, match="val.list"):
        nifti_split(tmp_path, lists=lists)


def test_patient_split_of_the_training_slices(acdc):
    root, _ = acdc
    names = nifti_slice_names(root)
    labeled, unlabeled = nifti_patient_split(root, 2, seed=3)
    assert (labeled, unlabeled) == split_by_patient(names, 2, seed=3) == nifti_patient_split(root, 2, seed=3)
    assert len({patient_id(n) for n in labeled}) == 2
    assert {patient_id(n) for n in labeled}.isdisjoint(patient_id(n) for n in unlabeled)
    first = nifti_patient_split(root, 1, seed=None)[0]
    assert {patient_id(n) for n in first} == {patient_id(names[0])}
    chosen = ["patient001_frame01", "patient001_frame09"]
    assert nifti_patient_split(root, patients=["patient001"], volumes=chosen)[0] == nifti_slice_names(root, chosen)


# ----------------------------------------------------------------------------- errors


def test_an_image_without_its_label_is_named(acdc, prostate):
    root, _ = acdc
    image = root / "training" / "patient003" / "patient003_frame09.nii.gz"
    (root / "training" / "patient003" / "patient003_frame09_gt.nii.gz").unlink()
    for call in (lambda: NiftiVolumes(root), lambda: NiftiSlices(root), lambda: nifti_split(root)):
        with pytest.raises(FileNotFoundError, match="has no label") as err:
            call()
        assert str(image) in str(err.value) and "patient003_frame09_gt.nii.gz" in str(err.value)
    root, _ = prostate
    (root / "labelsTr" / "prostate_06.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="has no label") as err:
        NiftiVolumes(root, "all")
    assert str(root / "imagesTr" / "prostate_06.nii.gz") in str(err.value)


def test_bad_files_and_arguments(acdc):
    root, truth = acdc
    folder = root / "training" / "patient001"
    label = np.asarray(nib.load(folder / "patient001_frame01_gt.nii.gz").dataobj)
    _save(folder / "patient001_frame01_gt.nii.gz", (label + 4).astype(np.uint8), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"patient001_frame01_gt.nii.gz: label ids must lie in \[0, 4\)"):
        NiftiVolumes(root, names=["patient001_frame01"])[0]
    _save(folder / "patient001_frame01_gt.nii.gz", label.astype(np.float32) + 0.5, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="whole numbers"):
        NiftiVolumes(root, names=["patient001_frame01"])[0]
    _save(folder / "patient001_frame01_gt.nii.gz", label[:-1], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="differ in size"):
        NiftiVolumes(root, names=["patient001_frame01"])[0]
    with pytest.raises(ValueError, match="not under"):
        NiftiVolumes(root, names=["patient042_frame01"])
    with pytest.raises(ValueError, match="split must be one of"):
        NiftiVolumes(root, "training")
    with pytest.raises(TypeError, match="names"):
        NiftiSlices(root, "patient002_frame01_slice_0")
    with pytest.raises(ValueError, match="<volume>_slice_<k>"):
        NiftiSlices(root, ["patient002_frame01"])
    with pytest.raises(ValueError, match="beyond their volume"):
        NiftiSlices(root, ["patient002_frame01_slice_9"])
    with pytest.raises(ValueError, match="cache_volumes"):
        NiftiSlices(root, cache_volumes=-1)


def _one_case(root, image_xyz, label_xyz=None, suffix=".nii.gz"):
    """root/training/patient001/patient001_frame01<suffix> and its label (zeros unless given); the two paths."""
    folder = root / "training" / "patient001"
    folder.mkdir(parents=True, exist_ok=True)
    image, label = folder / f"patient001_frame01{suffix}", folder / f"patient001_frame01_gt{suffix}"
    _save(image, image_xyz, (1.5, 1.25, 8.0))
    if label_xyz is None:
        label_xyz = np.zeros(np.shape(image_xyz)[:3], np.uint8)
    _save(label, label_xyz, (1.5, 1.25, 8.0))
    return image, label


def test_non_finite_voxels_neither_blank_nor_poison_the_volume(tmp_path):
    """Min and max come from the finite voxels; NaN and -Inf read as 0, +Inf as 1, and a warning counts them."""
    raw = np.linspace(100.0, 900.0, 5 * 7 * 3).reshape(5, 7, 3).astype(np.float32)
    raw[0, 0, 0] = 50.0  # the finite minimum ...
    raw[4, 6, 2] = 1000.0  # ... and maximum, at the corners
    raw[1, 2, 0], raw[3, 3, 1], raw[2, 5, 2], raw[0, 6, 1] = np.nan, np.nan, np.inf, -np.inf
    path, _ = _one_case(tmp_path, raw)
    with pytest.warns(UserWarning, match=r"patient001_frame01\.nii\.gz: 2 NaN and 2 Inf voxels of 105"):
        _, image, _ = NiftiVolumes(tmp_path, "all")[0]
    got = image.transpose(2, 1, 0)  # back to the file's (X, Y, Z)
    assert (got[1, 2, 0], got[3, 3, 1], got[2, 5, 2], got[0, 6, 1]) == (0.0, 0.0, 1.0, 0.0)
    finite = np.isfinite(raw)
    np.testing.assert_allclose(got[finite], (raw[finite].astype(np.float64) - 50.0) / 950.0, atol=1e-6)
    assert got[0, 0, 0] == 0.0 and got[4, 6, 2] == 1.0
    _save(path, np.full((5, 7, 3), np.nan, np.float32), (1.5, 1.25, 8.0))
    with pytest.raises(ValueError, match=r"patient001_frame01\.nii\.gz: no finite voxel \(105 NaN, 0 Inf of 105\)"):
        NiftiVolumes(tmp_path, "all")[0]


def test_prostate_modalities_are_cleaned_of_non_finite_voxels_one_by_one(prostate):
    root, truth = prostate
    path = root / "imagesTr" / "prostate_04.nii.gz"
    data = nib.load(path).get_fdata(dtype=np.float32)
    data[0, 0, 0, 1] = np.nan  # ADC only: T2 keeps its values, ADC its finite range
    _save(path, data, PROSTATE["prostate_04"][1])
    with pytest.warns(UserWarning, match=r"prostate_04\.nii\.gz \(modality 1\): 1 NaN and 0 Inf"):
        _, image, _ = NiftiVolumes(root, names=["prostate_04"], modality="both")[0]
    np.testing.assert_allclose(image[:, 0], truth["prostate_04"][0], atol=1e-6)
    adc = data[..., 1].astype(np.float64)
    low, high = np.nanmin(adc), np.nanmax(adc)
    want = np.nan_to_num((adc - low) / (high - low), nan=0.0).transpose(2, 1, 0)
    np.testing.assert_allclose(image[:, 1], want, atol=1e-6)
    assert image[0, 1, 0, 0] == 0.0


def test_files_the_reader_cannot_use_are_refused_by_name_when_the_data_set_is_built(tmp_path):
    """A 2-D file, a truncated download, a file that is no NIfTI at all: each stops NiftiVolumes and NiftiSlices
    at construction with a ValueError naming the file and what was expected, before any training."""
    image = np.arange(37 * 41 * 4, dtype=np.int16).reshape(37, 41, 4)
    root = tmp_path / "flat"
    path, _ = _one_case(root, image)
    _save(path, image[..., 0], (1.5, 1.25, 8.0))  # (X, Y): one slice saved on its own
    for build in (lambda: NiftiVolumes(root, "all"), lambda: NiftiSlices(root, ["patient001_frame01_slice_0"])):
        with pytest.raises(ValueError, match=r"expected an image \(X, Y, Z\); got shape \(37, 41\)") as err:
            build()
        assert str(path) in str(err.value)

    root = tmp_path / "truncated"
    path, label = _one_case(root, image)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # header intact, voxels cut off: nibabel still opens it
    for build in (lambda: NiftiVolumes(root, "all"), lambda: NiftiSlices(root, ["patient001_frame01_slice_0"])):
        with pytest.raises(ValueError, match=r"gzip stream is damaged or truncated.*\(37, 41, 4\) int16") as err:
            build()
        assert str(path) in str(err.value)
    path.write_bytes(whole)
    assert len(NiftiVolumes(root, "all")) == 1
    label.write_bytes(b"\0\5\26\7 not a NIfTI file")
    with pytest.raises(ValueError, match=r"expected a NIfTI-1/2 file") as err:
        NiftiVolumes(root, "all")
    assert str(label) in str(err.value)

    root = tmp_path / "uncompressed"
    path, _ = _one_case(root, image, suffix=".nii")
    path.write_bytes(path.read_bytes()[:-100])
    whole = 352 + image.nbytes  # the NIfTI-1 header and its extension flag, then the voxels
    with pytest.raises(ValueError, match=rf"holds {whole - 100} bytes of NIfTI data .*\({whole} bytes in all\)") as e:
        NiftiVolumes(root, "all")
    assert str(path) in str(e.value)


def test_a_missing_modality_or_a_label_of_another_size_is_refused_when_built(prostate):
    root, _ = prostate
    path = root / "imagesTr" / "prostate_01.nii.gz"
    _save(path, nib.load(path).get_fdata(dtype=np.float32)[..., 0], PROSTATE["prostate_01"][1])  # T2 only
    assert len(NiftiVolumes(root, names=["prostate_01"])) == 1
    with pytest.raises(ValueError, match=r"prostate_01\.nii\.gz: expected an image .* with modality 1"):
        NiftiVolumes(root, names=["prostate_01"], modality="ADC")
    label = root / "labelsTr" / "prostate_02.nii.gz"
    _save(label, np.zeros((W, H - 1, PROSTATE["prostate_02"][0]), np.uint8), PROSTATE["prostate_02"][1])
    with pytest.raises(ValueError, match=r"prostate_02\.nii\.gz and .*prostate_02\.nii\.gz differ in size"):
        NiftiSlices(root, ["prostate_02_slice_0"])


def test_a_multi_member_gzip_file_is_complete_and_read(tmp_path):
    """bgzip and concatenated streams are valid gzip whose trailer holds only the last member's length: the
    completeness check must decompress them instead of refusing them."""
    gzip = pytest.importorskip("gzip")
    image = np.arange(37 * 41 * 4, dtype=np.int16).reshape(37, 41, 4)
    path, _ = _one_case(tmp_path, image)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    _, got, _ = NiftiVolumes(tmp_path, "all")[0]
    np.testing.assert_allclose(got, _minmax(image).transpose(2, 1, 0), atol=1e-6)


def test_data_damaged_inside_the_stream_is_named_when_read(tmp_path):
    """A CRC error in the middle of a stream of the right length passes the cheap check; reading names the file."""
    image = np.random.default_rng(0).integers(0, 700, (37, 41, 4)).astype(np.int16)
    path, _ = _one_case(tmp_path, image)
    damaged = bytearray(path.read_bytes())
    middle = len(damaged) // 2
    damaged[middle : middle + 40] = bytes(b ^ 0xFF for b in damaged[middle : middle + 40])
    path.write_bytes(bytes(damaged))
    volumes = NiftiVolumes(tmp_path, "all")
    with pytest.raises(ValueError, match="cannot decode the NIfTI data") as err:
        volumes[0]
    assert str(path) in str(err.value)


def test_missing_nibabel_names_the_extra(acdc, monkeypatch):
    root, _ = acdc
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel now raises ImportError
    assert detect_layout(root) == "acdc-nifti"  # finding the layout needs no nibabel
    with pytest.raises(ImportError, match=r"contrastkit\[examples\]") as err:
        NiftiVolumes(root)
    assert "nibabel" in str(err.value)


def test_volume_slices_keep_their_spacings(acdc):
    root, truth = acdc
    volumes = NiftiVolumes(root, "all")
    head = volumes[1:3]
    assert isinstance(head, NiftiVolumes) and len(head) == 2 and head.names == volumes.names[1:3]
    assert head.spacings == volumes.spacings[1:3] and head[0][0] == volumes.names[1]
    assert volumes[-1][0] == volumes.names[-1]


# ----------------------------------------------------------------------------- the example script

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_pseudo_label.py"
TINY = ["--image-size", "32", "--width", "4", "--depth", "2", "--labeled-patients", "1", "--batch", "4",
        "--labeled-batch", "2", "--iterations", "2", "--rounds", "1", "--eval-every", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def script():
    for extra in ("kornia", "matplotlib", "tqdm"):
        pytest.importorskip(extra)
    if str(SCRIPT.parent) not in sys.path:  # the scripts import examples/presets.py from beside them
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("train_pseudo_label", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layout, classes", [("acdc", ("RV", "Myo", "LV")), ("prostate", ("PZ", "TZ"))])
def test_example_runs_on_each_nifti_layout_with_hd95_in_mm(script, request, tmp_path, layout, classes):
    root, _ = request.getfixturevalue(layout)
    out = tmp_path / "run"
    result = script.main(TINY + ["--data", str(root), "--out", str(out)])
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(result))
    assert result["hd95_unit"] == "mm" and tuple(result["config"]["classes"]) == classes
    test = NiftiVolumes(root, "test")
    assert [v["name"] for v in result["per_volume"]] == test.names
    for key in (*classes, "mean"):
        assert result["test"][key]["hd95"]["n"] == len(test) and np.isfinite(result["test"][key]["hd95"]["mean"])
    # HD95 recomputed from the best checkpoint with each volume's spacing from its header
    model = script.UNet(1, len(classes) + 1, base_width=4, depth=2, proj_dim=32)
    script.load_checkpoint(out / "best.pt", model)
    model.eval()
    for row, (name, image, label), spacing in zip(result["per_volume"], test, test.spacings, strict=True):
        assert row["name"] == name
        pred = predict_volume(model, image, 32)
        for c, cls in enumerate(classes, 1):
            assert row[cls]["hd95"] == pytest.approx(hd95(pred == c, label == c, spacing))
    assert (out / "results.png").is_file()


def test_example_stops_before_training_on_a_missing_label(script, acdc, tmp_path):
    root, _ = acdc
    (root / "training" / "patient005" / "patient005_frame01_gt.nii.gz").unlink()
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="patient005_frame01.nii.gz has no label"):
        script.main(TINY + ["--data", str(root), "--out", str(out)])
    assert not (out / "last.pt").exists()


def test_example_names_the_layouts_for_a_wrong_folder(script, tmp_path):
    with pytest.raises(FileNotFoundError, match="msd-prostate"):
        script.parse_args(["--data", str(tmp_path)])


# ----------------------------------------------------------------------------- real data (skip without a copy)


def _real(name):
    base = shared_data_root()
    return base / name if base is not None and (base / name).is_dir() else None


ACDC_NIFTI, PROSTATE_NIFTI = _real("acdc-nifti"), _real("Task05_Prostate")


@pytest.mark.skipif(ACDC_NIFTI is None, reason="no NIfTI ACDC copy at $CONTRASTKIT_DATA/acdc-nifti (only the h5 "
                    "copy is on the development machines)")
def test_real_acdc_nifti_matches_the_h5_copy():
    assert detect_layout(ACDC_NIFTI) == "acdc-nifti"
    volumes = NiftiVolumes(ACDC_NIFTI, "all")
    assert len(set(volumes.patient_ids)) == 100 and len(volumes) == 200
    for z, h, w in volumes.spacings[:10]:
        assert 5 <= z <= 10 and 1.3 <= h <= 1.8 and 1.3 <= w <= 1.8
    h5_root = find_acdc_root()
    if h5_root is None:
        pytest.skip("no h5 ACDC copy to compare with")
    h5py = pytest.importorskip("h5py")
    with h5py.File(h5_root / "data" / "patient001_frame01.h5") as f:
        h5_image, h5_label = f["image"][()], f["label"][()]
    _, image, label = volumes[volumes.names.index("patient001_frame01")]
    assert image.shape == h5_image.shape == (10, 256, 216)
    np.testing.assert_allclose(image, h5_image, atol=1e-5)
    np.testing.assert_array_equal(label, h5_label)


@pytest.mark.skipif(PROSTATE_NIFTI is None, reason="no MSD prostate copy at $CONTRASTKIT_DATA/Task05_Prostate")
def test_real_msd_prostate():
    assert detect_layout(PROSTATE_NIFTI) == "msd-prostate"
    volumes = NiftiVolumes(PROSTATE_NIFTI, "all", modality="both")
    assert len(volumes) == 32
    name, image, label = volumes[0]
    assert image.ndim == 4 and image.shape[1] == 2 and image.shape[0] == label.shape[0]
    assert set(np.unique(label)) <= {0, 1, 2} and 0 <= image.min() and image.max() <= 1
    z, h, w = volumes.spacings[0]
    assert 2 <= z <= 5 and 0.4 <= h <= 1 and 0.4 <= w <= 1
