"""NIfTI volumes as the data sets ship them: the official ACDC release and the MSD prostate set (Task05).

Layouts, told apart by :func:`detect_layout`::

    acdc-nifti    root/training/patientXXX/patientXXX_frameYY.nii.gz  image (X, Y, Z)
                  root/training/patientXXX/patientXXX_frameYY_gt.nii.gz  labels 0 bg, 1 RV, 2 myocardium, 3 LV
                  (Info.cfg and patientXXX_4d.nii.gz are not read); root may also be a folder of patient
                  folders itself, e.g. the official testing/ folder.
    msd-prostate  root/imagesTr/prostate_XX.nii.gz  (X, Y, Z, 2): modality 0 T2, 1 ADC
                  root/labelsTr/prostate_XX.nii.gz  (X, Y, Z): 0 bg, 1 peripheral zone, 2 transition zone
                  (imagesTs/ has no labels and is not read; macOS ``._*`` files are skipped)
    acdc-h5       the SSL4MIS HDF5 copy, read by ACDCSlices / ACDCVolumes (contrastkit.data.acdc)

Conventions, chosen so that arrays match the HDF5 copy and a model trained on one works on the other:

- orientation: the NIfTI index order reversed, (X, Y, Z) -> (Z, Y, X) = (Z, H, W), that is
  ``data.transpose(2, 1, 0)``, with no flip and no reorientation by the affine. SSL4MIS wrote the h5
  files from SimpleITK's ``GetArrayFromImage``, which returns exactly this (the official
  patient001_frame01 is 216 x 256 x 10 voxels; the h5 copy holds it as (10, 256, 216)).
- intensities: min-max per volume to 0..1, float32 (each modality on its own), as SSL4MIS. Non-finite voxels
  (a broken conversion or a division in preprocessing) must not decide the scale: min and max are those of the
  finite voxels, NaN and -Inf become 0 and +Inf 1; a volume with no finite voxel is a ValueError. See
  :func:`_minmax`.
- files: headers and data sizes are checked when a data set is built, so a 2-D or truncated file stops the
  run before training with a ValueError naming it (:func:`_open_nifti`).
- spacing: the header's voxel sizes (``get_zooms()``) in the same reversed order, (z, h, w) in mm.

Item types and shapes are those of the h5 readers, so ``predict_volume`` and the examples work unchanged.
"""

from __future__ import annotations

import copy
import gzip
import os
import re
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._optional import require
from .acdc import (
    CLASS_NAMES,
    NamedSlices,
    _check_mode,
    _check_size,
    fit_size,
    patient_id,
    read_list_file,
    split_by_patient,
    volume_id,
)
from .paths import is_hidden
from .splits import make_split

LAYOUTS = ("acdc-h5", "acdc-nifti", "msd-prostate")
PROSTATE_CLASS_NAMES = ("background", "PZ", "TZ")
MODALITIES = {"T2": (0,), "ADC": (1,), "both": (0, 1)}
SPLITS = ("train", "val", "test")

_ACDC_IMAGE = re.compile(r"^patient\d+_frame\d+\.nii(\.gz)?$")
_NIFTI = re.compile(r"^(?P<name>.+?)\.nii(\.gz)?$")
_SLICE = re.compile(r"^(?P<volume>.+)_slice_(?P<index>\d+)$")
_EXPECTED = (
    "acdc-h5 (data/ and *.list files: the SSL4MIS HDF5 copy), "
    "acdc-nifti (training/patientXXX/patientXXX_frameYY.nii.gz, or the patient folders themselves), "
    "msd-prostate (imagesTr/ and labelsTr/ of Task05_Prostate)"
)


def _nibabel():
    return require("nibabel", "reading NIfTI volumes")


def _as_folder(root) -> Path:
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path to a data folder; got {type(root).__name__}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root={str(root)!r} is not a folder")
    return root


# ----------------------------------------------------------------------------- finding the cases


@dataclass(frozen=True)
class _Case:
    name: str
    image: Path
    label: Path


def _stem(path: Path) -> str:
    return _NIFTI.match(path.name)["name"]


def _with_label(image: Path, folder: Path, label_stem: str) -> _Case:
    """The case of ``image`` and its label ``folder/<label_stem>.nii[.gz]`` (the image's extension first)."""
    name = _stem(image)
    extensions = dict.fromkeys((image.name[len(name):], ".nii.gz", ".nii"))
    candidates = [folder / f"{label_stem}{ext}" for ext in extensions]
    for label in candidates:
        if label.is_file():
            return _Case(name, image, label)
    raise FileNotFoundError(f"{image} has no label: expected {candidates[0]}")


def _acdc_images(root: Path) -> list[Path]:
    base = root / "training" if (root / "training").is_dir() else root
    return sorted(p for p in base.glob("patient*/patient*_frame*.nii*") if _ACDC_IMAGE.match(p.name))


def _acdc_cases(root: Path) -> list[_Case]:
    return [_with_label(image, image.parent, f"{_stem(image)}_gt") for image in _acdc_images(root)]


def _msd_cases(root: Path) -> list[_Case]:
    images = sorted(p for p in (root / "imagesTr").iterdir() if _NIFTI.match(p.name) and not is_hidden(p))
    return [_with_label(image, root / "labelsTr", _stem(image)) for image in images]


def detect_layout(root) -> str:
    """Which of :data:`LAYOUTS` the folder ``root`` holds: "acdc-h5", "acdc-nifti" or "msd-prostate".

    Raises FileNotFoundError naming the expected contents when none fits.
    """
    root = _as_folder(root)
    if (root / "data").is_dir() and any(root.glob("*.list")):
        return "acdc-h5"
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        return "msd-prostate"
    if _acdc_images(root):
        return "acdc-nifti"
    raise FileNotFoundError(f"{root} holds none of the known data layouts; expected one of: {_EXPECTED}")


class _Source:
    """The labeled cases under a NIfTI root, found once; headers are read when asked for."""

    def __init__(self, root):
        self.root = _as_folder(root)
        self.layout = detect_layout(self.root)
        if self.layout == "acdc-h5":
            raise ValueError(f"{self.root} is the ACDC HDF5 copy (acdc-h5); read it with ACDCSlices / ACDCVolumes")
        found = _acdc_cases(self.root) if self.layout == "acdc-nifti" else _msd_cases(self.root)
        if not found:
            raise FileNotFoundError(f"{self.root}: no images in the {self.layout} layout")
        self.cases = {c.name: c for c in found}
        self.class_names = CLASS_NAMES if self.layout == "acdc-nifti" else PROSTATE_CLASS_NAMES
        self._headers: dict[str, tuple[tuple[int, ...], tuple[float, float, float]]] = {}

    def select(self, names: Sequence[str]) -> list[_Case]:
        if isinstance(names, str):
            raise TypeError("names must be a sequence of names; got a str")
        unknown = [n for n in names if n not in self.cases]
        if unknown:
            raise ValueError(f"volumes not under {self.root}: {unknown[:5]}")
        return [self.cases[n] for n in names]

    def header(self, case: _Case, channels: tuple[int, ...] | None = None
               ) -> tuple[tuple[int, ...], tuple[float, float, float]]:
        """(shape in NIfTI order, spacing (z, h, w) in mm) of the image, from the headers alone.

        Both files of the case are opened and checked (:func:`_open_nifti`: readable, no voxel missing; the
        shapes the reader expects, ``channels`` present), so a damaged case fails when a data set is built
        rather than hours into training when its volume is first read.
        """
        if case.name not in self._headers:  # checking may decompress a file: once per case is enough
            self._headers[case.name] = self._checked_header(case)
        shape, spacing = self._headers[case.name]
        squeezed = _squeezed(shape, 4)
        modalities = squeezed[3] if len(squeezed) == 4 else 1
        if channels is not None and modalities <= max(channels):
            raise ValueError(f"{case.image}: expected an image (X, Y, Z, modalities) with modality "
                             f"{max(channels)}; got shape {shape}")
        return shape, spacing

    def _checked_header(self, case: _Case) -> tuple[tuple[int, ...], tuple[float, float, float]]:
        image, label = _open_nifti(case.image), _open_nifti(case.label)
        acdc = self.layout == "acdc-nifti"
        shape = _squeezed(image.shape, 3 if acdc else 4)
        if len(shape) not in ((3,) if acdc else (3, 4)):
            expected = "an image (X, Y, Z)" if acdc else "an image (X, Y, Z) or (X, Y, Z, modalities)"
            raise ValueError(f"{case.image}: expected {expected}; got shape {tuple(image.shape)}")
        label_shape = _squeezed(label.shape, 3)
        if len(label_shape) != 3:
            raise ValueError(f"{case.label}: expected a label map (X, Y, Z); got shape {tuple(label.shape)}")
        if shape[:3] != label_shape:
            raise ValueError(f"{case.image} and {case.label} differ in size: {tuple(image.shape)} and "
                             f"{tuple(label.shape)} in NIfTI (X, Y, Z) order")
        x, y, z = (float(s) for s in image.header.get_zooms()[:3])
        return tuple(image.shape), (z, y, x)

    def channels(self, modality) -> tuple[int, ...] | None:
        if self.layout == "acdc-nifti":
            if modality is not None:
                raise ValueError(f"ACDC has one image per frame: modality must be None; got {modality!r}")
            return None
        modality = "T2" if modality is None else modality
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {tuple(MODALITIES)}; got {modality!r}")
        return MODALITIES[modality]


# ----------------------------------------------------------------------------- opening and reading files

_CHUNK = 1 << 20
# What nibabel and the gzip/zlib layers below it raise for a file that is not, or no longer, a NIfTI file;
# nibabel's own ImageFileError and HeaderDataError derive from Exception only, hence the pair of lookups.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, zlib.error)


def _decode_errors() -> tuple[type[BaseException], ...]:
    nib = _nibabel()
    return (*_DECODE_ERRORS, nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError)


def _stored_bytes(path: Path) -> tuple[int, str]:
    """(bytes the file holds once decompressed, what went wrong or ""), decompressing ``path`` in chunks."""
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as err:
        return total, f"the gzip stream is damaged or truncated after {total} bytes ({err})"
    return total, ""


def _check_complete(path: Path, image) -> None:
    """Refuse a file that holds less data than its header describes.

    nibabel reads only the header when a file is opened, so a truncated download would otherwise pass every
    check until its volume is decoded. A ``.nii`` is checked by its size. A ``.nii.gz`` first by its gzip
    trailer, which stores the uncompressed length (mod 2**32): one read of 4 bytes. When that does not match
    (a truncated file ends in arbitrary bytes; a valid multi-member stream such as bgzip's stores only its last
    member's length) the stream is decompressed once to find out.
    """
    proxy = image.dataobj
    expected = int(proxy.offset) + int(np.prod(proxy.shape, dtype=np.int64)) * np.dtype(proxy.dtype).itemsize
    described = f"its header describes {tuple(proxy.shape)} {np.dtype(proxy.dtype)} voxels at byte {proxy.offset}"
    if path.name.endswith(".gz"):
        with open(path, "rb") as raw:
            raw.seek(-4, os.SEEK_END)
            if int.from_bytes(raw.read(4), "little") == expected % 2**32:
                return
        stored, problem = _stored_bytes(path)
        if problem:
            raise ValueError(f"{path}: {problem}; {described} ({expected} bytes in all): re-download or re-export it")
    else:
        stored = path.stat().st_size
    if stored < expected:
        raise ValueError(f"{path}: holds {stored} bytes of NIfTI data but {described} ({expected} bytes in all); "
                         "the file is truncated")


def _open_nifti(path: Path):
    """The nibabel image of ``path`` (header only), checked to be a NIfTI file that holds all its voxels."""
    try:
        image = _nibabel().load(path)
    except _decode_errors() as err:
        raise ValueError(f"{path}: expected a NIfTI-1/2 file (.nii or gzip-compressed .nii.gz) but it cannot be "
                         f"read ({type(err).__name__}: {err})") from err
    _check_complete(path, image)
    return image


def _voxels(path: Path, read: Callable):
    """``read(nibabel image)``, with any decoding failure (a file changed or damaged since the data set was
    built, a CRC error in the middle of the stream) raised as a ValueError naming ``path``."""
    errors = _decode_errors()
    try:
        return read(_nibabel().load(path))
    except errors as err:
        raise ValueError(f"{path}: cannot decode the NIfTI data ({type(err).__name__}: {err})") from err


def _squeezed(shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    """``shape`` without trailing 1s beyond ``ndim`` axes: the shape :func:`_drop_trailing_ones` leaves."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > ndim and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _drop_trailing_ones(data: np.ndarray, ndim: int) -> np.ndarray:
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def _minmax(volume: np.ndarray, where: str) -> np.ndarray:
    """``volume`` scaled to 0..1 by its finite voxels' min and max (all zeros when they are equal).

    NaN and -Inf take the finite minimum, +Inf the finite maximum, so one bad voxel cannot turn the whole
    volume into NaN or zeros; a UserWarning naming ``where`` counts them. A volume with no finite voxel
    cannot be scaled and raises ValueError.
    """
    low, high = volume.min(), volume.max()
    if not (np.isfinite(low) and np.isfinite(high)):  # NaN propagates through min/max: one test finds both
        finite = np.isfinite(volume)
        n_nan, n_inf = int(np.isnan(volume).sum()), int(np.isinf(volume).sum())
        if not finite.any():
            raise ValueError(f"{where}: no finite voxel ({n_nan} NaN, {n_inf} Inf of {volume.size}); "
                             "expected intensities to scale to 0..1")
        warnings.warn(f"{where}: {n_nan} NaN and {n_inf} Inf voxels of {volume.size}; scaled by the finite "
                      "voxels' range, NaN and -Inf read as 0, +Inf as 1", UserWarning, stacklevel=2)
        low, high = volume[finite].min(), volume[finite].max()
        volume = np.where(np.isposinf(volume), high, np.where(finite, volume, low))
    return (volume - low) / (high - low) if high > low else np.zeros_like(volume)


def _read_image(path: Path, channels: tuple[int, ...] | None) -> np.ndarray:
    data = _voxels(path, lambda image: image.get_fdata(dtype=np.float64))
    data = _drop_trailing_ones(data, 3 if channels is None else 4)
    if channels is None:
        if data.ndim != 3:
            raise ValueError(f"{path}: expected an image (X, Y, Z); got shape {data.shape}")
        return _minmax(data, str(path)).transpose(2, 1, 0)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4 or data.shape[3] <= max(channels):
        raise ValueError(f"{path}: expected an image (X, Y, Z, modalities) with modality {max(channels)}; "
                         f"got shape {data.shape}")
    image = np.stack([_minmax(data[..., c], f"{path} (modality {c})").transpose(2, 1, 0) for c in channels], axis=1)
    return image[:, 0] if len(channels) == 1 else image


def _read_label(path: Path, class_names: Sequence[str]) -> np.ndarray:
    data = _drop_trailing_ones(_voxels(path, lambda image: np.asanyarray(image.dataobj)), 3)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a label map (X, Y, Z); got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer) and not np.array_equal(data, np.round(data)):
        raise ValueError(f"{path}: label values must be whole numbers")
    label = data.astype(np.int64).transpose(2, 1, 0)
    if label.size and (label.min() < 0 or label.max() >= len(class_names)):
        raise ValueError(f"{path}: label ids must lie in [0, {len(class_names)}) {tuple(class_names)}; "
                         f"got [{label.min()}, {label.max()}]")
    return label


def _read_case(case: _Case, channels, class_names) -> tuple[np.ndarray, np.ndarray]:
    image, label = _read_image(case.image, channels), _read_label(case.label, class_names)
    if (image.shape[0], *image.shape[-2:]) != label.shape:
        raise ValueError(f"{case.image} and {case.label} differ in size: {image.shape} and {label.shape} "
                         "in (Z, H, W) order")
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)


# ----------------------------------------------------------------------------- splits


def _lists_folder(root: Path, lists) -> Path | None:
    files = lambda folder: [folder / f"{part}.list" for part in SPLITS]  # noqa: E731
    if lists is None:
        return root if all(p.is_file() for p in files(root)) else None
    missing = [str(p) for p in files(Path(lists)) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"lists={str(lists)!r} lacks {missing}")
    return Path(lists)


def _split(source: _Source, seed: int = 0, val: float = 0.1, test: float = 0.2, lists=None) -> dict[str, list[str]]:
    names = list(source.cases)
    folder = _lists_folder(source.root, lists)
    if folder is None:
        drawn = make_split(list(dict.fromkeys(patient_id(n) for n in names)), seed=seed, val=val, test=test)
        patients = {"train": drawn.train, "val": drawn.val, "test": drawn.test}
    else:
        patients = {part: [patient_id(n) for n in read_list_file(folder / f"{part}.list")] for part in SPLITS}
        unknown = sorted(set().union(*patients.values()) - {patient_id(n) for n in names})
        if unknown:
            raise ValueError(f"patients of the lists in {folder} are not under {source.root}: {unknown[:5]}")
    chosen = {part: set(ids) for part, ids in patients.items()}
    return {part: [n for n in names if patient_id(n) in chosen[part]] for part in SPLITS}


def nifti_split(root, *, seed: int = 0, val: float = 0.1, test: float = 0.2, lists=None) -> dict[str, list[str]]:
    """Volume names of the "train", "val" and "test" parts, split by patient (both ACDC frames stay together).

    By default the patients are drawn with :func:`~contrastkit.data.make_split` (SHA-256 order of
    ``"<seed>:<patient>"``): ``round(test * n)`` test and ``round(val * n)`` validation patients, the
    rest train; the 100 official ACDC training patients give 70 / 10 / 20, the ratio of the h5 copy.
    ``lists``, a folder with SSL4MIS ``train.list``, ``val.list`` and ``test.list`` (h5 names such as
    ``patient099_frame01``), takes each part's patients from those files instead; when ``lists`` is None
    and ``root`` itself holds the three files, they are used. Names keep the folder's sorted order.
    """
    return _split(_Source(root), seed, val, test, lists)


def _depths(source: _Source, cases: Sequence[_Case], channels: tuple[int, ...] | None = None) -> dict[str, int]:
    return {c.name: source.header(c, channels)[0][2] for c in cases}


def _slice_names(source: _Source, volumes: Sequence[str] | None) -> list[str]:
    cases = source.select(_split(source)["train"] if volumes is None else list(volumes))
    return [f"{name}_slice_{k}" for name, depth in _depths(source, cases).items() for k in range(depth)]


def nifti_slice_names(root, volumes: Sequence[str] | None = None) -> list[str]:
    """``<volume>_slice_<k>`` for every slice of ``volumes`` (default: the train part of ``nifti_split(root)``),
    volume by volume; depths come from the headers."""
    return _slice_names(_Source(root), volumes)


def nifti_patient_split(
    root,
    n_labeled: int | None = None,
    *,
    seed: int | None = 0,
    patients: Sequence[str] | None = None,
    volumes: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """(labeled, unlabeled) slice names of the training volumes, split by patient: the NIfTI counterpart of
    ``acdc_patient_split``. ``volumes`` defaults to the train part of ``nifti_split(root)``; ``n_labeled``,
    ``seed`` and ``patients`` as in ``split_by_patient`` (``seed=None``: the first patients in sorted order)."""
    return split_by_patient(nifti_slice_names(root, volumes), n_labeled, seed=seed, patients=patients)


# ----------------------------------------------------------------------------- datasets


class NiftiSlices(NamedSlices):
    """2D training slices of NIfTI volumes: item i is (image (M, S, S) float32, label (S, S) int64), M = 1
    except for the prostate's ``modality="both"`` (M = 2: T2, ADC).

    ``names`` picks slices ``<volume>_slice_<k>`` (e.g. one side of ``nifti_patient_split``); None means
    every slice of the train part of ``nifti_split(root)``. ``modality``: None for ACDC; "T2" (default),
    "ADC" or "both" for the prostate. A volume is read and normalised as a whole (as in the h5 copy) and
    kept for its other slices: ``cache_volumes`` bounds how many are kept (None: all of them, 0: none).
    ``transform(image, label) -> (image, label)`` runs after ``fit_size``.
    """

    def __init__(
        self,
        root,
        names: Sequence[str] | None = None,
        size: int = 256,
        mode: str = "resize",
        transform: Callable | None = None,
        *,
        modality: str | None = None,
        cache_volumes: int | None = None,
    ):
        source = _Source(root)
        self.root, self.layout, self.class_names = source.root, source.layout, source.class_names
        self._channels = source.channels(modality)
        self.modality = modality
        if isinstance(names, str):
            raise TypeError("names must be a sequence of slice names; got a str")
        self.names = _slice_names(source, None) if names is None else list(names)
        self.size = _check_size(size)
        self.mode = _check_mode(mode)
        self.transform = transform
        if cache_volumes is not None and (isinstance(cache_volumes, bool) or not isinstance(cache_volumes, int)
                                          or cache_volumes < 0):
            raise ValueError(f"cache_volumes must be None or an int >= 0; got {cache_volumes!r}")
        self.cache_volumes = cache_volumes
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        parsed = [_SLICE.match(n) for n in self.names]
        bad = [n for n, m in zip(self.names, parsed, strict=True) if m is None]
        if bad:
            raise ValueError(f"slice names look like <volume>_slice_<k>; got {bad[:3]}")
        depth = _depths(source, source.select(list(dict.fromkeys(volume_id(n) for n in self.names))), self._channels)
        too_deep = [n for n, m in zip(self.names, parsed, strict=True) if int(m["index"]) >= depth[m["volume"]]]
        if too_deep:
            raise ValueError(f"slices beyond their volume's depth: {too_deep[:3]}")
        self._slices = [(source.cases[m["volume"]], int(m["index"])) for m in parsed]

    def _volume(self, case: _Case) -> tuple[np.ndarray, np.ndarray]:
        volume = self._cache.pop(case.name, None)
        if volume is None:
            volume = _read_case(case, self._channels, self.class_names)
        self._cache[case.name] = volume
        while self.cache_volumes is not None and len(self._cache) > self.cache_volumes:
            self._cache.popitem(last=False)
        return volume

    def __getitem__(self, index: int):
        case, k = self._slices[index]
        image, label = self._volume(case)
        image = fit_size(torch.from_numpy(image[k]), self.size, self.mode)
        label = fit_size(torch.from_numpy(label[k]), self.size, self.mode)
        if image.dim() == 2:
            image = image[None]
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label


class NiftiVolumes(Sequence):
    """3D cases at their original size: item i is (name, image (Z, H, W) float32, label (Z, H, W) int64),
    both numpy, as ``ACDCVolumes``; with the prostate's ``modality="both"`` the image is (Z, 2, H, W).

    ``split`` is a part of ``nifti_split(root)`` ("train", "val", "test") or "all"; ``names`` (volume
    names, e.g. a part of another ``nifti_split``) overrides it. ``spacings[i]`` is volume i's voxel
    size (z, h, w) in mm, for ``hd95(..., spacing=...)``. Slicing (``volumes[:4]``) gives a NiftiVolumes
    of those volumes, spacings included.
    """

    def __init__(self, root, split: str = "test", names: Sequence[str] | None = None, *, modality: str | None = None):
        source = _Source(root)
        self.root, self.layout, self.class_names = source.root, source.layout, source.class_names
        self._channels = source.channels(modality)
        self.modality, self.split = modality, split
        if names is None:
            if split not in (*SPLITS, "all"):
                raise ValueError(f"split must be one of {(*SPLITS, 'all')}; got {split!r}")
            names = list(source.cases) if split == "all" else _split(source)[split]
        self._cases = source.select(list(names))
        self.names = [c.name for c in self._cases]
        self.spacings = [source.header(c, self._channels)[1] for c in self._cases]

    @property
    def patient_ids(self) -> list[str]:
        return [patient_id(n) for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            subset = copy.copy(self)
            subset._cases, subset.names, subset.spacings = self._cases[index], self.names[index], self.spacings[index]
            return subset
        case = self._cases[index]
        return (case.name, *_read_case(case, self._channels, self.class_names))
