"""Segmentation metrics: Dice, IoU, precision, recall and HD95, per image and aggregated.

All functions take one image or volume at a time (any number of dimensions, 2D and 3D in
practice) as NumPy arrays or torch tensors; loop over a batch and pass the per-image results
to :func:`aggregate` for mean ± std.

Empty-mask conventions (P = predicted foreground, T = true foreground):

- Dice, IoU, precision, recall: ``1.0`` when P and T are both empty (nothing to find,
  nothing found); ``0.0`` when exactly one of them is empty (every ratio whose denominator
  vanishes in that case is set to its worst value, as scikit-learn's ``zero_division=0``).
- HD95: ``0.0`` when both are empty. When exactly one is empty the default
  (``empty_hd95="max"``) is the largest distance possible in the grid, the diagonal
  ``sqrt(sum(((n_i - 1) * spacing_i) ** 2))``: a finite worst case, so a missed or
  hallucinated structure is penalised and means stay finite. ``empty_hd95="nan"`` returns
  NaN instead; :func:`aggregate` then leaves those images out and reports how many it left.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from ._optional import require

METRICS = ("dice", "iou", "precision", "recall", "hd95")


def _to_numpy(name: str, x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor; got {type(x).__name__}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension; got a scalar")
    return x


def _as_binary(name: str, x) -> np.ndarray:
    x = _to_numpy(name, x)
    if x.dtype == bool:
        return x
    if not np.isin(x, (0, 1)).all():
        raise ValueError(f"{name} must be binary (bool or values 0/1); threshold probabilities first")
    return x.astype(bool)


def _binary_pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_binary("pred", pred), _as_binary("target", target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape; got {p.shape} and {t.shape}")
    return p, t


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        spacing = (spacing,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing must give one value per dimension ({ndim}); got {spacing}")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive and finite; got {spacing}")
    return spacing


def _ratio(numerator: float, denominator: float) -> float:
    # A zero denominator only happens with an empty mask; see the module docstring.
    return numerator / denominator if denominator else 0.0


def _counts(p: np.ndarray, t: np.ndarray) -> tuple[int, int, int]:
    tp = int(np.count_nonzero(p & t))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp


def dice(pred, target) -> float:
    """``2|P∩T| / (|P| + |T|)``; 1 when both are empty."""
    p, t = _binary_pair(pred, target)
    tp, fp, fn = _counts(p, t)
    return 1.0 if tp + fp + fn == 0 else _ratio(2 * tp, 2 * tp + fp + fn)


def iou(pred, target) -> float:
    """``|P∩T| / |P∪T|`` (Jaccard); 1 when both are empty."""
    p, t = _binary_pair(pred, target)
    tp, fp, fn = _counts(p, t)
    return 1.0 if tp + fp + fn == 0 else _ratio(tp, tp + fp + fn)


def precision(pred, target) -> float:
    """``|P∩T| / |P|``; 1 when both are empty, 0 when only P is empty."""
    p, t = _binary_pair(pred, target)
    tp, fp, fn = _counts(p, t)
    return 1.0 if tp + fp + fn == 0 else _ratio(tp, tp + fp)


def recall(pred, target) -> float:
    """``|P∩T| / |T|`` (sensitivity); 1 when both are empty, 0 when only T is empty."""
    p, t = _binary_pair(pred, target)
    tp, fp, fn = _counts(p, t)
    return 1.0 if tp + fp + fn == 0 else _ratio(tp, tp + fn)


def _surface(mask: np.ndarray, ndimage) -> np.ndarray:
    # Foreground voxels with a face-neighbour (or the array border) outside the mask.
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _empty_value(empty_hd95, shape, spacing) -> float:
    if empty_hd95 == "max":
        return float(math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing, strict=True))))
    if empty_hd95 == "nan":
        return math.nan
    raise ValueError(f"empty_hd95 must be 'max' or 'nan'; got {empty_hd95!r}")


def hd95(pred, target, spacing=None, *, empty_hd95: str = "max") -> float:
    """95th percentile Hausdorff distance between the surfaces of P and T, in units of ``spacing``.

    Surface voxels are foreground voxels with a face-connected neighbour outside the mask
    (voxels on the array border count as outside). For each surface voxel of P the distance
    to the nearest surface voxel of T is taken (``scipy.ndimage.distance_transform_edt`` with
    ``sampling=spacing``), and vice versa; HD95 is the 95th percentile (linear interpolation)
    of both sets of distances pooled, as in MedPy's ``hd95``. ``spacing`` is one value per
    axis (e.g. ACDC (z, y, x) in mm) or a scalar; None means 1. Empty masks: see module doc.
    """
    p, t = _binary_pair(pred, target)
    spacing = _spacing(spacing, p.ndim)
    empty_value = _empty_value(empty_hd95, p.shape, spacing)
    p_any, t_any = p.any(), t.any()
    if not p_any and not t_any:
        return 0.0
    if not (p_any and t_any):
        return empty_value
    ndimage = require("scipy.ndimage", "contrastkit.metrics.hd95")
    surface_p, surface_t = _surface(p, ndimage), _surface(t, ndimage)
    to_t = ndimage.distance_transform_edt(~surface_t, sampling=spacing)[surface_p]
    to_p = ndimage.distance_transform_edt(~surface_p, sampling=spacing)[surface_t]
    return float(np.percentile(np.concatenate([to_t, to_p]), 95))


def binary_metrics(pred, target, spacing=None, *, empty_hd95: str = "max") -> dict[str, float]:
    """All of :data:`METRICS` for one binary prediction/target pair."""
    p, t = _binary_pair(pred, target)
    return {
        "dice": dice(p, t),
        "iou": iou(p, t),
        "precision": precision(p, t),
        "recall": recall(p, t),
        "hd95": hd95(p, t, spacing, empty_hd95=empty_hd95),
    }


def per_class_metrics(
    pred, target, num_classes: int, spacing=None, *, include_background: bool = False, empty_hd95: str = "max"
) -> dict[int, dict[str, float]]:
    """:func:`binary_metrics` of ``pred == c`` against ``target == c`` for each class ``c``.

    ``pred`` and ``target`` are integer label maps of one image or volume (values in
    ``[0, num_classes)``, 0 = background). Classes are ``1 .. num_classes - 1``, plus 0 when
    ``include_background``. For ACDC: ``per_class_metrics(pred, label, 4, spacing=(z, y, x))``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
    p, t = _to_numpy("pred", pred), _to_numpy("target", target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape; got {p.shape} and {t.shape}")
    for name, x in (("pred", p), ("target", t)):
        if x.dtype == bool or not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"{name} must be an integer label map; got dtype {x.dtype}")
        if x.size and (x.min() < 0 or x.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}); got [{x.min()}, {x.max()}]")
    first = 0 if include_background else 1
    return {
        c: binary_metrics(p == c, t == c, spacing, empty_hd95=empty_hd95) for c in range(first, num_classes)
    }


def _stats(values: Sequence[float]) -> dict[str, float]:
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    return {
        "mean": float(finite.mean()) if finite.size else math.nan,
        "std": float(finite.std()) if finite.size else math.nan,
        "n": int(finite.size),
        "n_nan": len(values) - int(finite.size),
    }


def aggregate(results: Iterable[Mapping]) -> dict:
    """Mean and (population, ddof=0) standard deviation over images, metric by metric.

    ``results`` is a list of what :func:`binary_metrics` or :func:`per_class_metrics`
    returns (nested mappings are aggregated leaf by leaf). Each leaf becomes
    ``{"mean", "std", "n", "n_nan"}``: NaN values (only from ``empty_hd95="nan"``) are left
    out of mean and std and counted in ``n_nan``.
    """
    results = list(results)
    if not results:
        raise ValueError("results is empty: nothing to aggregate")
    keys = list(results[0])
    for r in results:
        if not isinstance(r, Mapping) or list(r) != keys:
            raise ValueError(
                f"every result must have the keys {keys}; got {list(r) if isinstance(r, Mapping) else r}"
            )
    summary = {}
    for key in keys:
        values = [r[key] for r in results]
        if all(isinstance(v, Mapping) for v in values):
            summary[key] = aggregate(values)
        else:
            summary[key] = _stats([float(v) for v in values])
    return summary


def format_summary(summary: Mapping, digits: int = 4, prefix: str = "") -> str:
    """One line per metric, e.g. ``dice 0.8123 ± 0.1010 (n=100)``, for an :func:`aggregate` result."""
    lines = []
    for key, value in summary.items():
        if "mean" in value and "std" in value:
            extra = f", {value['n_nan']} NaN left out" if value.get("n_nan") else ""
            mean, std = f"{value['mean']:.{digits}f}", f"{value['std']:.{digits}f}"
            lines.append(f"{prefix}{key} {mean} ± {std} (n={value['n']}{extra})")
        else:
            lines.append(f"{prefix}class {key}:" if isinstance(key, int) else f"{prefix}{key}:")
            lines.append(format_summary(value, digits, prefix + "  "))
    return "\n".join(lines)
