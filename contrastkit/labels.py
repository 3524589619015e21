"""Label maps for the contrastive losses: pseudo-labels from logits and nearest resizing."""

from __future__ import annotations

import numbers

import torch

from ._validation import (
    finite_check,
    in_compute_dtype,
    plain,
    raise_first_failure,
    value_checks_enabled,
)

LABEL_FORMATS = ("index", "one_hot")


def check_label_map(name: str, labels, dims: int | None = None) -> torch.Tensor:
    """An integer (not bool) tensor, optionally with a fixed number of dimensions."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor; got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must have an integer dtype (class ids); got {labels.dtype}")
    if dims is not None and labels.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions; got shape {tuple(labels.shape)}")
    return labels


def check_labels_format(labels_format) -> str:
    if labels_format not in LABEL_FORMATS:
        raise ValueError(f"labels_format must be one of {', '.join(map(repr, LABEL_FORMATS))}; got {labels_format!r}")
    return labels_format


def index_label_map(name: str, labels, labels_format: str = "index",
                    ignore_index: int = -1) -> tuple[torch.Tensor, int | None]:
    """(B, h, w) class ids from the layouts segmentation code passes, and the class count where the
    layout fixes it (one-hot: K).

    ``"index"``: (B, h, w) or (B, 1, h, w) integer ids (MONAI and ``CrossEntropyLoss`` targets keep
    the channel axis). ``"one_hot"``: (B, K, h, w), any dtype, a 1 in the channel of the pixel's class;
    a pixel with no 1 (unlabelled: MONAI's ``AsDiscrete(to_onehot=...)`` of an ignored value) becomes
    ``ignore_index``. One-hot is
    taken only on request: a (B, K, h, w) map of ids and a one-hot map cannot be told apart by shape.
    The values of one-hot maps are checked by :func:`one_hot_value_check`.
    """
    labels = plain(labels)
    if labels_format == "one_hot":
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(labels).__name__}")
        if labels.dim() != 4 or min(labels.shape) == 0:
            raise ValueError(f"{name} with labels_format='one_hot' must be a non-empty (B, K, h, w) map; "
                             f"got shape {tuple(labels.shape)}")
        hot = labels != 0
        return torch.where(hot.any(dim=1), hot.int().argmax(dim=1), ignore_index), labels.shape[1]
    check_label_map(name, labels)
    if labels.dim() == 4 and labels.shape[1] == 1:
        return labels[:, 0], None
    if labels.dim() != 3:
        hint = ("; for one-hot (B, K, h, w) labels pass labels_format='one_hot'"
                if labels.dim() == 4 else "")
        raise ValueError(f"{name} must be (B, h, w) or (B, 1, h, w) class ids; got shape {tuple(labels.shape)}{hint}")
    return labels, None


def one_hot_value_check(name: str, labels: torch.Tensor):
    """(flag, message) for :func:`raise_first_failure`: entries other than 0 and 1, or a pixel with two 1s."""
    bad = ((labels != 0) & (labels != 1)).any() | ((labels != 0).sum(dim=1) > 1).any()
    return bad, f"{name} with labels_format='one_hot' must hold 0s and 1s, at most one 1 per pixel"


def _check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}")
    return ignore_index


def _nearest_indices(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    # Output index i reads input index floor(i * in / out): torch's mode="nearest", in exact
    # integer arithmetic so no rounding of in/out can shift a row.
    return torch.arange(out_size, device=device) * in_size // out_size


def downsample_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Resize a (B, h, w) label map to ``size`` by nearest-neighbour sampling.

    Output pixel (i, j) takes the label of input pixel ``(floor(i·h/H), floor(j·w/W))`` — the
    rule of ``F.interpolate(mode="nearest")``. Labels are copied, never averaged, so class ids
    and ``ignore_index`` values survive unchanged. Works for up-sampling as well.

    Args:
        labels: (B, h, w) or (B, 1, h, w) integer class ids (any integer dtype; it is kept).
        size: ``H`` or ``(H, W)``, the output size.

    Returns:
        (B, H, W) labels — (B, 1, H, W) for (B, 1, h, w) input — with the dtype and device of
        ``labels``, a plain tensor even for a subclass such as MONAI's MetaTensor.
    """
    labels = plain(labels)
    check_label_map("labels", labels)
    if labels.dim() == 4 and labels.shape[1] == 1:
        return downsample_labels(labels[:, 0], size)[:, None]
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, h, w) or (B, 1, h, w); got shape {tuple(labels.shape)}")
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (int(size), int(size))
    elif isinstance(size, (tuple, list, torch.Size)) and len(size) == 2 and all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in size
    ):
        size = (int(size[0]), int(size[1]))
    else:
        raise TypeError(f"size must be an int or a pair of ints (H, W); got {size!r}")
    if min(size) < 1:
        raise ValueError(f"size must be positive; got {size}")
    if 0 in labels.shape[1:]:
        raise ValueError(f"labels must have a non-empty spatial size; got shape {tuple(labels.shape)}")
    return resize_nearest(labels, size)


def resize_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resizing of any (B, h, w) map (labels, confidences) to ``size``."""
    h, w = x.shape[1:]
    if (h, w) == tuple(size):
        return x
    rows = _nearest_indices(h, size[0], x.device)
    cols = _nearest_indices(w, size[1], x.device)
    return x[:, rows[:, None], cols[None, :]]


@torch.no_grad()
def pseudo_labels(
    logits: torch.Tensor, threshold: float | None = None, ignore_index: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels and their confidence from segmentation logits.

    With K = ``logits.shape[1]``:

    * K > 1 (softmax): ``label = argmax_k p_k``, ``confidence = max_k p_k`` with ``p = softmax(logits)``.
    * K = 1 (sigmoid, binary): ``p = sigmoid(logits)``, ``label = 1 if p >= 0.5 else 0``,
      ``confidence = max(p, 1 - p)``.

    Pixels whose confidence is below ``threshold`` get the label ``ignore_index`` (their
    confidence is still returned). Nothing here is differentiable: pseudo-labels are targets.

    Args:
        logits: (B, K, ...) floating logits, e.g. (B, K, H, W).
        threshold: None, or a confidence in [0, 1] below which a pixel is ignored.
        ignore_index: the label of ignored pixels; it must not be a class id in [0, K)
            (K = 2 for sigmoid logits).

    Returns:
        ``(labels, confidence)``: int64 labels of shape ``(B, ...)`` and the confidence of the
        same shape, float32 (float64 for float64 logits).
    """
    logits = plain(logits)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a floating torch.Tensor; got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must have a floating dtype; got {logits.dtype}")
    if logits.dim() < 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be (B, K, ...) with K >= 1 classes; got shape {tuple(logits.shape)}")
    ignore_index = _check_ignore_index(ignore_index)
    num_classes = max(logits.shape[1], 2)
    if 0 <= ignore_index < num_classes:
        raise ValueError(
            f"ignore_index={ignore_index} is a class id (K={num_classes}); use a value outside [0, K)"
        )
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be None or a number in [0, 1]; got {threshold!r}")
    if value_checks_enabled(logits.device):
        raise_first_failure([finite_check(("logits", logits))])

    logits = in_compute_dtype(logits)
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        labels = (p >= 0.5).long()
        confidence = torch.maximum(p, 1 - p)
    else:
        confidence, labels = torch.softmax(logits, dim=1).max(dim=1)
    if threshold is not None:
        labels = torch.where(confidence >= threshold, labels, ignore_index)
    return labels, confidence
