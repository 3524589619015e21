"""Segmentation metrics: Dice, IoU, precision, recall and HD95, per image and aggregated.

Shapes (``layout=``):

- default (``layout=None``): one image or volume, 1 to 3 dimensions (2D and 3D in practice);
  a 3-D array is a volume, never a batch of 2-D images. Arrays with 4 or more dimensions are
  refused with a ValueError: a MONAI batch ``(N, 1, H, W)`` read as one 4-D volume gives a
  pooled Dice and an HD95 measured across images, both silently wrong.
- ``layout="image"``: one image or volume of any number of dimensions (a 4-D volume, say).
- ``layout="NCHW"`` / ``layout="NCDHW"``: MONAI's batch-first, channel-first layout. Each
  image ``n`` and channel ``c`` is scored on its own, and the result is an array of shape
  ``(N, C')`` like MONAI's ``reduction="none"``. One channel (``C = 1``) is the foreground
  mask; ``C = K > 1`` channels are one binary mask per class (one-hot) and
  ``include_background`` must say whether channel 0 is scored (``C' = K`` or ``K - 1``).

All functions take NumPy arrays or torch tensors; pass per-image results to :func:`aggregate`
for mean ± std.

Empty-mask conventions (P = predicted foreground, T = true foreground):

- Dice, IoU, precision, recall: ``1.0`` when P and T are both empty (nothing to find,
  nothing found); ``0.0`` when exactly one of them is empty (every ratio whose denominator
  vanishes in that case is set to its worst value, as scikit-learn's ``zero_division=0``).
  Dice then equals MONAI's ``DiceMetric(ignore_empty=False)``.
- HD95, ``convention="medpy"`` (default): ``0.0`` when both are empty. When exactly one is
  empty the default (``empty_hd95="max"``) is the largest distance possible in the grid, the
  diagonal ``sqrt(sum(((n_i - 1) * spacing_i) ** 2))``: a finite worst case, so a missed or
  hallucinated structure is penalised and means stay finite. ``empty_hd95="nan"`` returns
  NaN instead; :func:`aggregate` then leaves those images out and reports how many it left.
- HD95, ``convention="monai"``: NaN when both are empty, and by default (``empty_hd95="nan"``)
  when exactly one is, as MONAI's ``HausdorffDistanceMetric`` returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ._optional import require

METRICS = ("dice", "iou", "precision", "recall", "hd95")
LAYOUTS = ("image", "NCHW", "NCDHW")
CONVENTIONS = ("medpy", "monai")


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


def _check_layout(layout, ndim: int) -> None:
    if layout is None:
        if ndim >= 4:
            raise ValueError(
                f"layout must be given for {ndim}-D pred/target: layout='NCHW' for a batch (N, C, H, W) or "
                "layout='NCDHW' for (N, C, D, H, W) as MONAI passes them (scored image by image), or "
                f"layout='image' for one {ndim}-D image; without it a batch would be scored as one volume"
            )
        return
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be None or one of {LAYOUTS}; got {layout!r}")
    expected = {"NCHW": 4, "NCDHW": 5}.get(layout)
    if expected is not None and ndim != expected:
        raise ValueError(f"layout={layout!r} expects {expected}-D pred/target; got {ndim}-D")


def _is_batch(layout) -> bool:
    return layout in ("NCHW", "NCDHW")


def _channels(num_channels: int, include_background) -> list[int]:
    """Indices of the channels scored; a single channel is the foreground, so there is no background to drop."""
    if num_channels < 1:
        raise ValueError("pred and target need at least one channel (axis 1) for a batched layout; got 0")
    if num_channels == 1:
        if include_background is not None and not isinstance(include_background, bool):
            raise ValueError(f"include_background must be True, False or None; got {include_background!r}")
        return [0]
    if not isinstance(include_background, bool):
        raise ValueError(
            f"include_background must be True or False for one-hot input with {num_channels} channels "
            f"(whether channel 0, the background, is scored); got {include_background!r}"
        )
    return list(range(0 if include_background else 1, num_channels))


def _check_single(layout, include_background) -> None:
    if include_background is not None:
        raise ValueError(
            "include_background applies to batched one-hot input only (layout='NCHW' or 'NCDHW'); "
            f"got include_background={include_background!r} with layout={layout!r}"
        )


def _per_channel(pred, target, layout, include_background, score: Callable[[np.ndarray, np.ndarray], float]):
    """``score`` of one binary pair, or an (N, C') float64 array of it over a batch's images and channels."""
    p, t = _binary_pair(pred, target)
    _check_layout(layout, p.ndim)
    if not _is_batch(layout):
        _check_single(layout, include_background)
        return score(p, t)
    channels = _channels(p.shape[1], include_background)
    out = np.empty((p.shape[0], len(channels)), dtype=np.float64)
    for n in range(p.shape[0]):
        for j, c in enumerate(channels):
            out[n, j] = score(p[n, c], t[n, c])
    return out


def _dice(p: np.ndarray, t: np.ndarray) -> float:
    tp, fp, fn = _counts(p, t)
    return 1.0 if tp + fp + fn == 0 else _ratio(2 * tp, 2 * tp + fp + fn)


def _iou(p: np.ndarray, t: np.ndarray) -> float:
    tp, fp, fn = _counts(p, t)
    return 1.0 if tp + fp + fn == 0 else _ratio(tp, tp + fp + fn)


def _precision(p: np.ndarray, t: np.ndarray) -> float:
    tp, fp, fn = _counts(p, t)
    return 1.0 if tp + fp + fn == 0 else _ratio(tp, tp + fp)


def _recall(p: np.ndarray, t: np.ndarray) -> float:
    tp, fp, fn = _counts(p, t)
    return 1.0 if tp + fp + fn == 0 else _ratio(tp, tp + fn)


def dice(pred, target, *, layout=None, include_background=None):
    """``2|P∩T| / (|P| + |T|)``; 1 when both are empty. A float, or ``(N, C')`` for a batched layout."""
    return _per_channel(pred, target, layout, include_background, _dice)


def iou(pred, target, *, layout=None, include_background=None):
    """``|P∩T| / |P∪T|`` (Jaccard); 1 when both are empty. A float, or ``(N, C')`` for a batched layout."""
    return _per_channel(pred, target, layout, include_background, _iou)


def precision(pred, target, *, layout=None, include_background=None):
    """``|P∩T| / |P|``; 1 when both are empty, 0 when only P is empty. A float, or ``(N, C')`` batched."""
    return _per_channel(pred, target, layout, include_background, _precision)


def recall(pred, target, *, layout=None, include_background=None):
    """``|P∩T| / |T|`` (sensitivity); 1 when both are empty, 0 when only T is empty. A float, or ``(N, C')``."""
    return _per_channel(pred, target, layout, include_background, _recall)


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


def _hd95_options(convention, empty_hd95) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}; got {convention!r}")
    if empty_hd95 is None:
        # Each convention's own default, so convention="monai" alone reproduces MONAI's NaNs.
        return "max" if convention == "medpy" else "nan"
    return empty_hd95


def _hd95(p: np.ndarray, t: np.ndarray, spacing, empty_hd95: str, convention: str) -> float:
    empty_value = _empty_value(empty_hd95, p.shape, spacing)
    p_any, t_any = p.any(), t.any()
    if not p_any and not t_any:
        # MedPy-style tables score "nothing there, nothing predicted" as a perfect 0; MONAI calls it undefined.
        return 0.0 if convention == "medpy" else math.nan
    if not (p_any and t_any):
        return empty_value
    ndimage = require("scipy.ndimage", "contrastkit.metrics.hd95")
    surface_p, surface_t = _surface(p, ndimage), _surface(t, ndimage)
    to_t = ndimage.distance_transform_edt(~surface_t, sampling=spacing)[surface_p]
    to_p = ndimage.distance_transform_edt(~surface_p, sampling=spacing)[surface_t]
    if convention == "medpy":
        return float(np.percentile(np.concatenate([to_t, to_p]), 95))
    # Pooling lets the larger surface outvote the other: a stray blob of a few voxels falls
    # inside the pooled top 5 % and vanishes, while its own directed 95th percentile does not.
    return float(max(np.percentile(to_t, 95), np.percentile(to_p, 95)))


def hd95(pred, target, spacing=None, *, empty_hd95: str | None = None, convention: str = "medpy",
         layout=None, include_background=None):
    """95th percentile Hausdorff distance between the surfaces of P and T, in units of ``spacing``.

    Surface voxels are foreground voxels with a face-connected neighbour outside the mask
    (voxels on the array border count as outside). For each surface voxel of P the distance
    to the nearest surface voxel of T is taken (``scipy.ndimage.distance_transform_edt`` with
    ``sampling=spacing``), and vice versa. ``convention="medpy"`` (default): the 95th
    percentile (linear interpolation) of both sets of distances pooled, as MedPy's ``hd95``.
    ``convention="monai"``: the larger of the two directed 95th percentiles, as MONAI's
    ``HausdorffDistanceMetric(percentile=95)``; the two differ most when one mask has a small
    stray component. ``spacing`` is one value per spatial axis (e.g. ACDC (z, y, x) in mm) or a
    scalar, shared by every image of a batch; None means 1. ``empty_hd95`` (``"max"`` or
    ``"nan"``) is the value when exactly one mask is empty; None takes the convention's
    default. Empty masks, ``layout`` and ``include_background``: see the module doc.
    """
    empty_hd95 = _hd95_options(convention, empty_hd95)
    p, t = _binary_pair(pred, target)
    _check_layout(layout, p.ndim)
    spatial = p.ndim - 2 if _is_batch(layout) else p.ndim
    spacing = _spacing(spacing, spatial)
    _empty_value(empty_hd95, (1,) * spatial, spacing)  # reject a bad empty_hd95 even when no mask is empty
    return _per_channel(p, t, layout, include_background,
                        lambda a, b: _hd95(a, b, spacing, empty_hd95, convention))


def binary_metrics(pred, target, spacing=None, *, empty_hd95: str | None = None, convention: str = "medpy",
                   layout=None, include_background=None):
    """All of :data:`METRICS` for one binary prediction/target pair, as a dict.

    With a batched ``layout`` a list with one entry per image, ready for :func:`aggregate`:
    the dict itself for single-channel input, ``{channel: dict}`` for one-hot input.
    """
    empty_hd95 = _hd95_options(convention, empty_hd95)
    p, t = _binary_pair(pred, target)
    _check_layout(layout, p.ndim)
    if not _is_batch(layout):
        _check_single(layout, include_background)
        spacing = _spacing(spacing, p.ndim)
        return _binary_metrics(p, t, spacing, empty_hd95, convention)
    spacing = _spacing(spacing, p.ndim - 2)
    channels = _channels(p.shape[1], include_background)
    results = []
    for n in range(p.shape[0]):
        scores = {c: _binary_metrics(p[n, c], t[n, c], spacing, empty_hd95, convention) for c in channels}
        results.append(scores[0] if p.shape[1] == 1 else scores)
    return results


def _binary_metrics(p, t, spacing, empty_hd95, convention) -> dict[str, float]:
    return {
        "dice": _dice(p, t),
        "iou": _iou(p, t),
        "precision": _precision(p, t),
        "recall": _recall(p, t),
        "hd95": _hd95(p, t, spacing, empty_hd95, convention),
    }


def per_class_metrics(
    pred, target, num_classes: int, spacing=None, *, include_background: bool = False,
    empty_hd95: str | None = None, convention: str = "medpy", layout=None,
):
    """:func:`binary_metrics` of ``pred == c`` against ``target == c`` for each class ``c``.

    ``pred`` and ``target`` are integer label maps of one image or volume (values in
    ``[0, num_classes)``, 0 = background). Classes are ``1 .. num_classes - 1``, plus 0 when
    ``include_background``. For ACDC: ``per_class_metrics(pred, label, 4, spacing=(z, y, x))``.
    With ``layout="NCHW"``/``"NCDHW"`` the label maps are MONAI's ``(N, 1, *spatial)`` and the
    result is a list of the per-image dicts.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
    empty_hd95 = _hd95_options(convention, empty_hd95)
    p, t = _to_numpy("pred", pred), _to_numpy("target", target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape; got {p.shape} and {t.shape}")
    _check_layout(layout, p.ndim)
    for name, x in (("pred", p), ("target", t)):
        if x.dtype == bool or not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"{name} must be an integer label map; got dtype {x.dtype}")
        if x.size and (x.min() < 0 or x.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}); got [{x.min()}, {x.max()}]")
    first = 0 if include_background else 1
    if not _is_batch(layout):
        spacing = _spacing(spacing, p.ndim)
        return {c: _binary_metrics(p == c, t == c, spacing, empty_hd95, convention) for c in range(first, num_classes)}
    if p.shape[1] != 1:
        raise ValueError(
            f"pred and target label maps need one channel (N, 1, ...) with layout={layout!r}; got {p.shape}: "
            "use binary_metrics(..., layout=...) for one-hot input"
        )
    spacing = _spacing(spacing, p.ndim - 2)
    return [
        {c: _binary_metrics(p[n, 0] == c, t[n, 0] == c, spacing, empty_hd95, convention)
         for c in range(first, num_classes)}
        for n in range(p.shape[0])
    ]


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
