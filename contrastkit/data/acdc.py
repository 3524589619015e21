"""ACDC cardiac MRI in the SSL4MIS HDF5 layout: slices for training, volumes for 3D evaluation.

Layout under ``root`` (the ``acdc`` folder)::

    train_slices.list  train.list  val.list  test.list
    data/slices/<patient>_frameNN_slice_K.h5   keys image (H, W) float32 0..1, label (H, W) uint8 0..3
    data/<patient>_frameNN.h5                  keys image (Z, H, W), label (Z, H, W)

Slices have varying sizes (e.g. 256x216); networks want a fixed size, so every slice goes through
``fit_size`` and every prediction back through ``restore_size`` (``predict_volume`` does both).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .paths import shared_data_root

NUM_CLASSES = 4
CLASS_NAMES = ("background", "RV", "myocardium", "LV")
MODES = ("resize", "pad")

_SLICE_SUFFIX = re.compile(r"_slice_\d+$")
_FRAME_SUFFIX = re.compile(r"_frame\d+$")


def _h5py():
    try:
        import h5py
    except ImportError as err:  # h5py is an optional dependency
        raise ImportError(
            "reading ACDC needs h5py; install it with `pip install contrastkit[examples]`"
        ) from err
    return h5py


# ----------------------------------------------------------------------------- locating the data


def find_acdc_root() -> Path | None:
    """The ACDC folder under :func:`~contrastkit.data.shared_data_root` (``$CONTRASTKIT_DATA``), which
    may also be the ``acdc`` folder itself; None when the variable is unset or holds no ACDC folder."""
    base = shared_data_root()
    if base is None:
        return None
    for path in (base / "acdc", base):
        if (path / "train_slices.list").is_file() and (path / "data").is_dir():
            return path
    return None


def _as_root(root) -> Path:
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path to the ACDC folder; got {type(root).__name__}")
    root = Path(root)
    if not (root / "data").is_dir():
        raise FileNotFoundError(
            f"root={str(root)!r} is not an ACDC folder: expected {str(root / 'data')!r} "
            "(SSL4MIS layout: data/slices/*.h5, data/*.h5 and *.list files)"
        )
    return root


def read_list(root, split: str) -> list[str]:
    """Names in ``<root>/<split>.list`` ("train_slices", "train", "val", "test"), without ``.h5``."""
    path = _as_root(root) / f"{split}.list"
    if not path.is_file():
        raise FileNotFoundError(f"split={split!r}: no list file {str(path)!r}")
    return read_list_file(path)


def read_list_file(path) -> list[str]:
    """The non-empty lines of an SSL4MIS ``.list`` file, without ``.h5`` (no check of a data folder)."""
    names = [line.strip() for line in Path(path).read_text().splitlines()]
    return [n[:-3] if n.endswith(".h5") else n for n in names if n]


# ----------------------------------------------------------------------------- names and the labeled split


def volume_id(name: str) -> str:
    """``patient001_frame01_slice_3`` -> ``patient001_frame01`` (a volume name is returned unchanged)."""
    return _SLICE_SUFFIX.sub("", name)


def patient_id(name: str) -> str:
    """``patient001_frame01_slice_3`` or ``patient001_frame01`` -> ``patient001``.

    Names without a frame (the synthetic set's ``case003_slice_2``) give the volume: one volume per patient.
    """
    return _FRAME_SUFFIX.sub("", volume_id(name))


def split_by_patient(
    names: Sequence[str],
    n_labeled: int | None = None,
    *,
    seed: int | None = 0,
    patients: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Split slice names into (labeled, unlabeled) so that each patient lies wholly on one side.

    Either ``patients`` lists the labeled patients explicitly, or ``n_labeled`` of them are drawn:
    with ``seed`` an int, uniformly at random (numpy ``default_rng(seed)``); with ``seed=None``, the first
    ``n_labeled`` patients in order of first appearance in ``names`` (the SSL4MIS convention, which labels
    the first 32 / 68 / 136 slices of ``train_slices.list`` for 1 / 3 / 7 patients). Both lists keep the
    order of ``names``.
    """
    names = list(names)
    order = list(dict.fromkeys(patient_id(n) for n in names))
    if patients is not None:
        if isinstance(patients, str):
            raise TypeError("patients must be a sequence of patient ids, e.g. ['patient001']; got a str")
        chosen = list(dict.fromkeys(patients))
        unknown = sorted(set(chosen) - set(order))
        if unknown:
            raise ValueError(f"patients not among the training patients: {unknown[:5]}")
        if n_labeled is not None and n_labeled != len(chosen):
            raise ValueError(f"n_labeled={n_labeled} disagrees with {len(chosen)} explicit patients")
    else:
        if n_labeled is None:
            raise ValueError("give n_labeled (a number of patients) or patients (an explicit list)")
        if isinstance(n_labeled, bool) or not isinstance(n_labeled, (int, np.integer)):
            raise TypeError(f"n_labeled must be an int; got {type(n_labeled).__name__}")
        if not 1 <= n_labeled <= len(order):
            raise ValueError(f"n_labeled must be in [1, {len(order)}] (number of patients); got {n_labeled}")
        if seed is None:
            chosen = order[:n_labeled]
        else:
            pick = np.random.default_rng(seed).permutation(len(order))[:n_labeled]
            chosen = [order[i] for i in pick]
    chosen = set(chosen)
    labeled = [n for n in names if patient_id(n) in chosen]
    unlabeled = [n for n in names if patient_id(n) not in chosen]
    return labeled, unlabeled


def acdc_patient_split(
    root, n_labeled: int | None = None, *, seed: int | None = 0, patients: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """(labeled, unlabeled) names from ``train_slices.list``, split by patient; see ``split_by_patient``."""
    return split_by_patient(read_list(root, "train_slices"), n_labeled, seed=seed, patients=patients)


# ----------------------------------------------------------------------------- fixed size and back


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"size must be an int; got {type(size).__name__}")
    if size < 1:
        raise ValueError(f"size must be positive; got {size}")
    return int(size)


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    return mode


def _as_tensor(x, name: str) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)), True
    if isinstance(x, torch.Tensor):
        return x, False
    raise TypeError(f"{name} must be a numpy array or torch.Tensor; got {type(x).__name__}")


def _center_window(n: int, size: int) -> tuple[slice, slice]:
    """(source, target) windows that center an axis of length n inside length size (pad or crop)."""
    if n <= size:
        start = (size - n) // 2
        return slice(0, n), slice(start, start + n)
    start = (n - size) // 2
    return slice(start, start + size), slice(0, size)


def _pad_or_crop(x: torch.Tensor, hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    src_h, dst_h = _center_window(hw[0], out_hw[0])
    src_w, dst_w = _center_window(hw[1], out_hw[1])
    out = x.new_zeros(*x.shape[:-2], *out_hw)
    out[..., dst_h, dst_w] = x[..., src_h, src_w]
    return out


def _interpolate(x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear for floating maps (images, logits), nearest-exact for integer maps (labels)."""
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:])
    if x.is_floating_point():
        work = flat if x.dtype == torch.float64 else flat.float()  # half precision interpolates in fp32
        out = F.interpolate(work, size=out_hw, mode="bilinear", align_corners=False).to(x.dtype)
    else:
        out = F.interpolate(flat.float(), size=out_hw, mode="nearest-exact").to(x.dtype)
    return out.reshape(*lead, *out_hw)


def _resample(x, out_hw: tuple[int, int], mode: str, name: str):
    mode = _check_mode(mode)
    t, was_numpy = _as_tensor(x, name)
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., H, W); got shape {tuple(t.shape)}")
    hw = tuple(t.shape[-2:])
    if hw == out_hw:
        out = t.clone()
    elif mode == "pad":
        out = _pad_or_crop(t, hw, out_hw)
    else:
        out = _interpolate(t, out_hw)
    return out.numpy() if was_numpy else out


def fit_size(x, size: int = 256, mode: str = "resize"):
    """Bring the last two dims of ``x`` (..., H, W) to (size, size); numpy in -> numpy out, same dtype.

    ``mode="resize"`` interpolates (bilinear for float arrays such as images, nearest-exact for integer
    arrays such as labels). ``mode="pad"`` centers the slice on a zero canvas; an axis longer than
    ``size`` is center-cropped (lossy: the cropped border is lost).
    """
    size = _check_size(size)
    return _resample(x, (size, size), mode, "x")


def restore_size(pred, original_hw: tuple[int, int], mode: str = "resize"):
    """Undo ``fit_size``: map a fixed-size prediction (..., S, S) back to (..., H, W).

    Integer predictions (label maps) use nearest-exact, float ones (logits, probabilities) bilinear.
    In pad mode the canvas is cropped back; a part cropped away by ``fit_size`` comes back as 0.
    """
    if len(original_hw) != 2:
        raise ValueError(f"original_hw must be (H, W); got {original_hw!r}")
    out_hw = (_check_size(original_hw[0]), _check_size(original_hw[1]))
    return _resample(pred, out_hw, mode, "pred")


def _check_logits(logits, batch: int, size: int) -> None:
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else None
    if shape is None or len(shape) != 4 or (shape[0], *shape[2:]) != (batch, size, size):
        got = shape if shape is not None else type(logits).__name__
        raise ValueError(f"model_fn must return logits (B, C, {size}, {size}) for B={batch}; got {got}")


@torch.no_grad()
def predict_volume(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    image,
    size: int = 256,
    mode: str = "resize",
    batch_size: int = 16,
    device=None,
):
    """Segment a volume (Z, H, W) slice by slice; returns labels (Z, H, W) int64 (numpy in -> numpy out).

    Each slice is brought to (size, size) with ``fit_size``; ``model_fn`` maps a float32 batch (B, 1, S, S)
    (on ``device`` when given) to logits (B, C, S, S). The logits are restored to (H, W) with
    ``restore_size`` (bilinear, or crop in pad mode) before the argmax. Put the model in eval mode first.
    A volume of M channels (Z, M, H, W), e.g. two MRI modalities, gives batches (B, M, S, S).
    """
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable; got {type(model_fn).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    volume, was_numpy = _as_tensor(image, "image")
    if volume.dim() not in (3, 4):
        raise ValueError(f"image must be a volume (Z, H, W) or (Z, M, H, W); got shape {tuple(volume.shape)}")
    size = _check_size(size)
    hw = tuple(volume.shape[-2:])
    fitted = fit_size(volume.float().cpu(), size, mode)
    if volume.dim() == 3:
        fitted = fitted[:, None]
    labels = torch.empty((volume.shape[0], *hw), dtype=torch.int64)
    for start in range(0, volume.shape[0], batch_size):
        batch = fitted[start : start + batch_size]
        logits = model_fn(batch if device is None else batch.to(device))
        _check_logits(logits, batch.shape[0], size)
        labels[start : start + batch.shape[0]] = restore_size(logits.float().cpu(), hw, mode).argmax(1)
    return labels.numpy() if was_numpy else labels


# ----------------------------------------------------------------------------- datasets


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Image in 0..1 as float32, and labels. An integer image (a packed copy) is multiplied by its
    ``scale`` attribute (1/255 when it has none)."""
    with _h5py().File(path, "r") as f:
        image = f["image"]
        scale = 1.0 if image.dtype.kind == "f" else float(image.attrs.get("scale", 1 / 255))
        return np.asarray(image[()], dtype=np.float32) * np.float32(scale), np.asarray(f["label"][()], dtype=np.int64)


def _existing(folder: Path, names: list[str], what: str) -> list[Path]:
    paths = [folder / f"{n}.h5" for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} {what} file(s) missing, e.g. {missing[:3]}")
    return paths


class NamedSlices(torch.utils.data.Dataset):
    """A slice data set whose ``names`` (``<patient>_frameNN_slice_K`` style) say which patient
    and volume each slice belongs to, so labeled subsets can be chosen by patient."""

    names: list[str]

    @property
    def patient_ids(self) -> list[str]:
        return [patient_id(n) for n in self.names]

    @property
    def volume_ids(self) -> list[str]:
        return [volume_id(n) for n in self.names]

    def __len__(self) -> int:
        return len(self.names)



class ACDCSlices(NamedSlices):
    """2D training slices: item i is (image (1, S, S) float32, label (S, S) int64).

    ``names`` picks slices (e.g. one side of ``acdc_patient_split``); None means all of
    ``train_slices.list``. ``transform(image, label) -> (image, label)`` runs after ``fit_size``.
    """

    def __init__(
        self,
        root,
        names: Sequence[str] | None = None,
        size: int = 256,
        mode: str = "resize",
        transform: Callable | None = None,
    ):
        self.root = _as_root(root)
        if isinstance(names, str):
            raise TypeError("names must be a sequence of slice names; got a str")
        names = read_list(self.root, "train_slices") if names is None else list(names)
        self.names = [n[:-3] if n.endswith(".h5") else n for n in names]
        self.size = _check_size(size)
        self.mode = _check_mode(mode)
        self.transform = transform
        self._paths = _existing(self.root / "data" / "slices", self.names, "slice")

    def __getitem__(self, index: int):
        image, label = _read_h5(self._paths[index])
        image = fit_size(torch.from_numpy(image), self.size, self.mode)[None]
        label = fit_size(torch.from_numpy(label), self.size, self.mode)
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label


class ACDCVolumes(Sequence):
    """3D cases of ``<split>.list`` at their original size: item i is (name, image (Z, H, W) float32,
    label (Z, H, W) int64), both numpy. Evaluate with ``predict_volume`` and 3D metrics."""

    def __init__(self, root, split: str = "test", names: Sequence[str] | None = None):
        self.root = _as_root(root)
        self.split = split
        names = read_list(self.root, split) if names is None else list(names)
        self.names = [n[:-3] if n.endswith(".h5") else n for n in names]
        self._paths = _existing(self.root / "data", self.names, "volume")

    @property
    def patient_ids(self) -> list[str]:
        return [patient_id(n) for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        image, label = _read_h5(self._paths[index])
        if image.ndim != 3 or image.shape != label.shape:
            raise ValueError(f"{self._paths[index]}: expected image and label (Z, H, W) of one shape; "
                             f"got {image.shape} and {label.shape}")
        return self.names[index], image, label
