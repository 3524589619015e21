r"""Local contrast on (pseudo-)label maps (Chaitanya et al., MedIA 2023).

Pixels that share a label — ground truth on labeled images, a pseudo-label on unlabeled ones —
are pulled together and pixels with different labels pushed apart. Two forms, both computed by
:func:`contrastkit.info_nce`:

``mode="prototype"`` (the original code). Image *a* is paired with image *b* = ``pair_index[a]``.
:math:`\mu_c^x` is the mean of the *un-normalised* embeddings of the usable class-*c* pixels of
image *x* (it takes part in the gradient). An anchor pixel *i* of class *c* in *a* has the
positives :math:`P_i = \{\mu_c^a, \mu_c^b\}` and the candidates
:math:`K_a = \{\mu_k^x : x \in \{a, b\},\ k \text{ present in } x\}`:

.. math::
    \ell_i = -\frac{1}{|P_i|} \sum_{p \in P_i}
             \Big( \frac{\cos(z_i, p)}{\tau} - \log \sum_{k \in K_a} e^{\cos(z_i, k)/\tau} \Big)

``mode="pixel"`` (the paper's text). Supervised contrast over all usable pixels of the batch:
the positives of pixel *i* are all other pixels with its label, the candidates all other pixels.

In both, the loss is :math:`\sum_i w_i \ell_i / \sum_i w_i` over all anchors of the batch, with
:math:`w_i` the anchor's confidence (1 without ``confidence``).
"""

from __future__ import annotations

import numbers
import warnings

import torch

from . import _validation as v
from ._loss_module import LossModule
from ._temperature import TemperatureModule
from ._validation import check_flag, compute_dtype
from .core import info_nce
from .distributed import gather_keys
from .labels import (
    check_label_map,
    check_labels_format,
    downsample_labels,
    index_label_map,
    one_hot_value_check,
    resize_nearest,
)

MODES = ("prototype", "pixel")
BACKGROUND = 0
# Prototype mode without num_classes sizes its (B, K) means by the largest label it reads: a stray
# id of 10^12 must be an error, not a 16 TB allocation.
MAX_INFERRED_CLASSES = 4096
_warned_foreground_only = False  # the warning of _warn_foreground_only is given once per process


def _check_settings(temperature, mode, anchors_per_class, include_background, ignore_index, confidence_threshold,
                    num_classes, labels_format, gather_distributed, reduction, backend) -> None:
    """The settings checks of :func:`pseudo_label_contrast`, which :class:`PseudoLabelContrast` runs at
    construction."""
    v.check_temperature(temperature)
    v.check_choice("mode", mode, MODES)
    check_flag("gather_distributed", gather_distributed)
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    v.check_choice("backend", backend, v.BACKENDS)
    check_labels_format(labels_format)
    if anchors_per_class is not None and (
        isinstance(anchors_per_class, bool) or not isinstance(anchors_per_class, int) or anchors_per_class < 1
    ):
        raise ValueError(f"anchors_per_class must be None or a positive int; got {anchors_per_class!r}")
    if include_background is not None and not isinstance(include_background, bool):
        raise TypeError(f"include_background must be None (auto) or a bool; got {type(include_background).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}")
    if confidence_threshold is not None and (
        isinstance(confidence_threshold, bool)
        or not isinstance(confidence_threshold, numbers.Real)
        or not 0 <= confidence_threshold <= 1
    ):
        raise ValueError(
            f"confidence_threshold must be None or a number in [0, 1]; got {confidence_threshold!r}"
        )
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be None or a positive int; got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} is a class id (num_classes={num_classes})")


def _check_inputs(embeddings, labels, confidence, pair_index, generator):
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor; got {type(embeddings).__name__}")
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must have a floating dtype; got {embeddings.dtype}")
    if embeddings.dim() != 4 or min(embeddings.shape) == 0:
        raise ValueError(
            f"embeddings must be a non-empty (B, D, H, W) map; got shape {tuple(embeddings.shape)}"
        )
    batch, device = embeddings.shape[0], embeddings.device
    check_label_map("labels", labels, dims=3)
    if labels.shape[0] != batch or min(labels.shape) == 0:
        raise ValueError(f"labels must be (B, h, w) with B={batch}; got shape {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but embeddings are on {device}")
    if confidence is not None:
        if not isinstance(confidence, torch.Tensor) or not confidence.is_floating_point():
            got = confidence.dtype if isinstance(confidence, torch.Tensor) else type(confidence).__name__
            raise TypeError(f"confidence must be a floating torch.Tensor; got {got}")
        if confidence.shape != labels.shape:
            raise ValueError(f"confidence must have the shape of labels {tuple(labels.shape)}; "
                             f"got {tuple(confidence.shape)}")
        if confidence.device != device:
            raise ValueError(f"confidence is on {confidence.device} but embeddings are on {device}")
    if pair_index is not None:
        check_label_map("pair_index", pair_index, dims=1)
        if pair_index.shape[0] != batch:
            raise ValueError(f"pair_index must be (B,) with B={batch}; got shape {tuple(pair_index.shape)}")
        if pair_index.device != device:
            raise ValueError(f"pair_index is on {pair_index.device} but embeddings are on {device}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")


def _check_values(embeddings, labels, confidence, pair_index, ignore_index, num_classes, extra=()):
    """The value checks, tested in one host sync (see :func:`contrastkit.value_checks_enabled`)."""
    bad_labels = (labels < 0) & (labels != ignore_index)
    if num_classes is not None:
        bad_labels |= (labels >= num_classes) & (labels != ignore_index)
    expected = f"class ids in [0, {num_classes})" if num_classes is not None else "non-negative class ids"
    checks = [v.finite_check(("embeddings", embeddings)),
              (bad_labels.any(), lambda: f"labels must be {expected} or ignore_index={ignore_index}; "
                                         f"found {int(labels[bad_labels][0])}")]
    if confidence is not None:
        checks.append((~((confidence >= 0) & (confidence <= 1)).all(),
                       "confidence must lie in [0, 1] (and not be NaN)"))
    if pair_index is not None:
        checks.append((((pair_index < 0) | (pair_index >= labels.shape[0])).any(),
                       f"pair_index values must be image indices in [0, {labels.shape[0]})"))
    v.raise_first_failure(checks + list(extra))


def _warn_foreground_only() -> None:
    """Binary labels with the background left out: class 1 alone takes part, so no anchor has a
    negative (prototype mode: loss and gradient exactly 0; pixel mode: positives only). Nothing
    fails, which is why it needs saying; once per process, as training repeats it every step."""
    global _warned_foreground_only
    if _warned_foreground_only or torch.compiler.is_compiling():
        return
    _warned_foreground_only = True
    warnings.warn(
        "PseudoLabelContrast: the labels are binary (classes 0 and 1) and include_background=False "
        "leaves class 1 alone, so no anchor has a negative and the loss cannot train anything; "
        "pass include_background=True (or None, the default, which includes it for binary labels)",
        UserWarning, stacklevel=3)


def _draw(labels: torch.Tensor, usable: torch.Tensor, generator: torch.Generator | None):
    """Each image's pixels in a random order within each class: sorted by (usable first, class,
    uniform noise). Returns (order, class of each sorted pixel, usable, rank within its class),
    each (B, H·W); the first k of a class's ranks are a uniform sample of k of its pixels
    without replacement. Shapes never depend on the values: no host synchronisation."""
    batch = labels.shape[0]
    flat, use = labels.reshape(batch, -1), usable.reshape(batch, -1)
    if generator is None:
        # No generator argument at all: torch.compile(dynamic=True) fails on torch.rand with a
        # symbolic size and an explicit generator=None.
        noise = torch.rand(flat.shape, device=labels.device)
    else:
        noise = torch.rand(flat.shape, generator=generator, device=generator.device).to(labels.device)
    # float64 holds a class id below 2^28 and the noise's 24 bits side by side, exactly.
    key = torch.where(use, flat.to(torch.float64) + noise.to(torch.float64), float("inf"))
    order = key.argsort(dim=1)
    sorted_labels, sorted_use = flat.gather(1, order), use.gather(1, order)
    position = torch.arange(flat.shape[1], device=labels.device).expand_as(flat)
    first = torch.ones_like(sorted_use)
    first[:, 1:] = sorted_labels[:, 1:] != sorted_labels[:, :-1]
    run_start = torch.cummax(torch.where(first, position, 0), dim=1).values
    return order, sorted_labels, sorted_use, position - run_start


def sample_anchors(labels: torch.Tensor, usable: torch.Tensor, per_class: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask of ``min(per_class, count)`` pixels drawn uniformly without replacement from the
    usable pixels of each (image, class) of a (B, H, W) label map, without a host sync."""
    labels, usable = v.plain(labels), v.plain(usable)
    order, _, sorted_use, rank = _draw(labels, usable, generator)
    chosen = sorted_use & (rank < per_class)
    return torch.zeros_like(chosen).scatter(1, order, chosen).reshape(usable.shape)


def sample_pixels(labels: torch.Tensor, per_class: int, *, usable: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Class-balanced pixel sampling without a host sync: a (B, H, W) bool mask of
    ``min(per_class, count)`` pixels drawn uniformly without replacement from each (image, class)
    of a (B, H, W) label map — a fixed budget per class, so a small lesion is drawn as often as the
    background. ``usable`` (bool, same shape; default: every pixel with a label >= 0) says which
    pixels may be drawn, e.g. those above a confidence threshold. The draw is one sort per image on
    the labels' device; ``generator`` makes it reproducible. Pixel mode of
    :class:`PseudoLabelContrast` samples its anchors with it; any pixel-level loss can too, e.g.
    ``supcon_loss(features.permute(0, 2, 3, 1)[mask], labels[mask])``.
    """
    labels = v.plain(labels)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3 or labels.is_floating_point():
        raise ValueError(f"labels must be a (B, H, W) integer label map; got {_described(labels)}")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive int; got {per_class!r}")
    if usable is None:
        usable = labels >= 0
    elif not isinstance(usable, torch.Tensor) or usable.dtype != torch.bool or usable.shape != labels.shape:
        raise ValueError(f"usable must be a bool mask of the labels' shape {tuple(labels.shape)}; "
                         f"got {_described(usable)}")
    return sample_anchors(labels, usable, per_class, generator)


def _described(x) -> str:
    return f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _anchor_slots(labels, usable, per_class, first_class, num_classes, generator):
    """The drawn anchors in a fixed layout: per image, ``per_class`` slots for each class in
    [first_class, num_classes), filled with pixel indices (B, S) and marked (B, S) where a class
    has fewer usable pixels. Fixed shapes: no host sync, and every process of a DDP job holds as
    many rows as the others whatever its batch holds."""
    order, sorted_labels, sorted_use, rank = _draw(labels, usable, generator)
    slots = (num_classes - first_class) * per_class
    chosen = sorted_use & (rank < per_class) & (sorted_labels >= first_class) & (sorted_labels < num_classes)
    # Pixels not drawn all go to one extra slot, cut off below.
    slot = torch.where(chosen, (sorted_labels - first_class) * per_class + rank, slots)
    pixel = torch.zeros(order.shape[0], slots + 1, dtype=order.dtype, device=order.device).scatter(1, slot, order)
    filled = torch.zeros(order.shape[0], slots + 1, dtype=torch.bool, device=order.device).scatter(1, slot, chosen)
    return pixel[:, :slots], filled[:, :slots]


def _prototype_keys(embeddings, labels, usable, pair_index, first_class, num_classes, ignore_index):
    """The class means of each image and, with ``pair_index``, of its pair, as B equal blocks of keys
    (per anchor image: its own means of classes ``first_class .. num_classes - 1``, then its pair's),
    with their labels.

    Every (image, class) slot is a key, so shapes never depend on the values (no host
    synchronisation; ``torch.compile`` traces it): a class absent from an image, and the pair's
    copy of a self-paired image's means, are labelled ``ignore_index`` and take no part. The sums
    are one batched product of the (B, D, H·W) map with the (B, H·W, K) class membership.
    """
    batch = labels.shape[0]
    dtype = compute_dtype(embeddings.dtype)  # class means of half inputs are summed in fp32
    classes = torch.arange(first_class, num_classes, device=labels.device)
    member = ((labels.reshape(batch, 1, -1) == classes[:, None]) & usable.reshape(batch, 1, -1)).to(dtype)
    sums = torch.bmm(embeddings.flatten(2).to(dtype), member.transpose(1, 2))  # (B, D, K)
    counts = member.sum(dim=2)  # (B, K)
    means = (sums / counts.clamp_min(1)[:, None, :]).transpose(1, 2)  # (B, K, D)
    present = counts > 0
    own_labels = torch.where(present, classes, ignore_index)
    if pair_index is None:  # each image with itself: its own means, once
        return means.reshape(-1, means.shape[2]), own_labels.reshape(-1)
    own = torch.arange(batch, device=labels.device)
    pair_labels = torch.where(present[pair_index] & (pair_index != own)[:, None], classes, ignore_index)
    keys = torch.stack([means, means[pair_index]], dim=1).reshape(-1, means.shape[2])
    key_labels = torch.stack([own_labels, pair_labels], dim=1).reshape(-1)
    return keys, key_labels


def pseudo_label_contrast(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    confidence: torch.Tensor | None = None,
    pair_index: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.1,
    mode: str = "prototype",
    anchors_per_class: int | None = None,
    include_background: bool | None = None,
    ignore_index: int = -1,
    confidence_threshold: float | None = None,
    num_classes: int | None = None,
    labels_format: str = "index",
    generator: torch.Generator | None = None,
    gather_distributed: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Local pseudo-label contrast; see the module docstring for the formulas.
    ``reduction="none"`` gives each anchor's loss (0 for pixels that are not anchors): (B, H, W) at
    the embeddings' resolution in prototype mode, one entry per sampled pixel row in pixel mode.

    Args:
        embeddings: (B, D, H, W) pixel embeddings (e.g. a 1×1-conv head on the decoder output).
        labels: (B, h, w) or (B, 1, h, w) integer ground truth or pseudo-labels, or with
            ``labels_format="one_hot"`` a (B, K, h, w) one-hot map. If (h, w) ≠ (H, W) they are
            resized to (H, W) by nearest-neighbour sampling (:func:`downsample_labels`).
            Tensor subclasses (MONAI's MetaTensor) are read as plain tensors.
        confidence: optional (B, h, w) or (B, 1, h, w) values in [0, 1], resized like ``labels``. Pixels below
            ``confidence_threshold`` take no part at all (neither anchor nor class mean nor
            key); the other anchors are weighted by their confidence. Use 1 for labeled images.
        pair_index: optional (B,) image indices: image i is contrasted against the class means
            of itself and of image ``pair_index[i]`` (e.g. the other augmented view). Default:
            each image is paired with itself. Prototype mode only.
        temperature: τ > 0 (0.1 in the original).
        mode: ``"prototype"`` (the original code) or ``"pixel"`` (every usable pixel of the
            batch against every other, through the memory-lean core op).
        anchors_per_class: None — every usable pixel is an anchor; else the number of anchors
            drawn per (image, class) uniformly without replacement (all if fewer). In pixel mode
            the drawn pixels are both the anchors and the keys.
        include_background: whether class 0 takes part. ``None`` (the default): only when the labels
            are binary — ``num_classes == 2``, or without ``num_classes`` the batch's largest class
            id is 1 — since with class 1 alone no anchor has a negative. ``False`` is the
            original's foreground-only contrast (meant for several foreground classes); with
            binary labels it warns once.
        ignore_index: label of pixels that take no part.
        confidence_threshold: None or a value in [0, 1]; used only when ``confidence`` is given.
        num_classes: if given, labels must lie in [0, num_classes) or equal ``ignore_index``. In
            prototype mode it also spares a host synchronisation (the class count is otherwise
            read from the labels), so ``torch.compile`` traces the whole loss. Multi-class users
            should pass it: it also fixes ``include_background=None``'s choice for every batch.
        labels_format: ``"index"`` — class ids, (B, h, w) or (B, 1, h, w); ``"one_hot"`` —
            (B, K, h, w) with a 1 in the channel of each pixel's class (any dtype), a pixel without
            a 1 being ignored; K is the class count (``num_classes``, if given, must equal it).
        generator: random generator for the anchor sampling.
        gather_distributed: pixel mode under DDP: the usable pixels of every process are keys
            (:func:`contrastkit.gather_keys`); each process returns the mean over its own anchors.
            Prototype mode contrasts each image with its pair's class means, which are local, so
            nothing is gathered there.
        backend: passed to :func:`contrastkit.info_nce`.

    Returns:
        The confidence-weighted mean of the anchor losses: float32 (float64 for float64
        embeddings). Degenerate batches are legal: with no usable anchor the loss is exactly 0
        (attached to the graph); an anchor whose pair holds only its own class has loss 0 and
        still counts in the mean; absent classes simply have no anchors and no means.
    """
    _check_settings(temperature, mode, anchors_per_class, include_background, ignore_index, confidence_threshold,
                    num_classes, labels_format, gather_distributed, reduction, backend)
    embeddings, confidence, pair_index = v.plain(embeddings), v.plain(confidence), v.plain(pair_index)
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor; got {type(embeddings).__name__}")
    one_hot = v.plain(labels) if labels_format == "one_hot" else None
    labels, format_classes = index_label_map("labels", labels, labels_format, ignore_index)
    if format_classes is not None:
        if num_classes is not None and num_classes != format_classes:
            raise ValueError(f"num_classes={num_classes} but the one-hot labels have {format_classes} channels")
        if 0 <= ignore_index < format_classes:
            raise ValueError(f"ignore_index={ignore_index} is a class id (one-hot labels with "
                             f"K={format_classes}); use a value outside [0, K)")
        num_classes = format_classes
    if isinstance(confidence, torch.Tensor) and confidence.dim() == 4 and confidence.shape[1] == 1:
        confidence = confidence[:, 0]
    _check_inputs(embeddings, labels, confidence, pair_index, generator)
    if mode == "pixel" and pair_index is not None:
        raise ValueError(
            "pair_index applies to mode='prototype' only; mode='pixel' contrasts the whole batch"
        )
    checks_on = v.value_checks_enabled(embeddings.device)
    if checks_on:
        _check_values(embeddings, labels, confidence, pair_index, ignore_index, num_classes,
                      [] if one_hot is None else [one_hot_value_check("labels", one_hot)])
    if include_background is None and num_classes is not None:
        include_background = num_classes == 2

    batch, _, height, width = embeddings.shape
    labels = downsample_labels(labels, (height, width)).long()
    seen = labels != ignore_index  # usable but for the background rule
    if confidence is not None:
        confidence = resize_nearest(confidence, (height, width))
        if confidence_threshold is not None:
            seen &= confidence >= confidence_threshold
    if mode == "prototype" and num_classes is None:  # read from the labels: one host sync
        if labels.device.type == "meta":
            raise ValueError("prototype mode without num_classes reads the number of classes from the labels' "
                             "values, which meta tensors do not hold: pass num_classes")
        num_classes = int(torch.where(seen, labels, 0).max()) + 1
        if num_classes > MAX_INFERRED_CLASSES:
            raise ValueError(
                f"labels reach {num_classes - 1}: prototype mode keeps one mean per class id up to the largest, "
                f"so without num_classes it takes at most {MAX_INFERRED_CLASSES} classes; remap the ids to "
                f"0..K-1 and pass num_classes=K")
        if include_background is None:
            include_background = num_classes == 2
    if include_background is None:
        # Pixel mode without num_classes: decided on the device (no host sync), per batch.
        binary = torch.where(seen, labels, 0).amax() == 1
        usable = seen & ((labels != BACKGROUND) | binary)
    elif include_background:
        usable = seen
    else:
        usable = seen & (labels != BACKGROUND)
        if num_classes == 2 or (num_classes is None and checks_on
                                and int(torch.where(seen, labels, 0).amax()) == 1):
            _warn_foreground_only()
    weights = None if confidence is None else confidence.reshape(batch, -1)
    options = dict(temperature=temperature, normalize=True, denominator="all",
                   ignore_index=ignore_index, reduction=reduction, backend=backend)
    if mode == "pixel":
        rows, row_labels, row_weights = _pixel_anchors(embeddings, labels, usable, weights, anchors_per_class,
                                                       include_background, num_classes, ignore_index, generator)
        if gather_distributed:
            # Every process reaches the collective, whatever its batch holds: a process without a
            # usable pixel sends rows labelled ignore_index, which take no part anywhere.
            keys, key_labels, offset = gather_keys(rows, row_labels)
            return info_nce(rows, keys, labels=row_labels, key_labels=key_labels, self_key_offset=offset,
                            weights=row_weights, **options)
        return info_nce(rows, labels=row_labels, weights=row_weights, **options)

    # Prototype mode costs O(pixels x classes): every pixel is a query (the map as it is, B blocks
    # of H·W queries against their image's 2K means), the non-anchors ignored.
    anchors = usable
    if anchors_per_class is not None:
        anchors = sample_anchors(labels, usable, anchors_per_class, generator)
    # Background takes no part unless included: its means would be keys of no anchor and no positive.
    first_class = 0 if include_background else BACKGROUND + 1
    keys, key_labels = _prototype_keys(embeddings, labels, usable, None if pair_index is None else pair_index.long(),
                                       min(first_class, num_classes - 1), num_classes, ignore_index)
    anchor_labels = torch.where(anchors, labels, ignore_index).reshape(-1)
    queries = embeddings.to(keys.dtype)  # half maps meet their means (summed in fp32) in fp32
    loss = info_nce(queries, keys, labels=anchor_labels, key_labels=key_labels, groups=batch,
                    weights=None if weights is None else weights.reshape(-1), **options)
    return loss.reshape(batch, height, width) if reduction == "none" else loss


def _pixel_anchors(embeddings, labels, usable, weights, anchors_per_class, include_background, num_classes,
                   ignore_index, generator):
    """Pixel mode's rows: (N, D) embeddings, their labels and weights (or None).

    With ``anchors_per_class`` and ``num_classes`` the anchors fill a fixed number of slots per
    image and class (unused slots labelled ``ignore_index``): no host sync. Otherwise the usable
    (or drawn) pixels are gathered first — the core op's cost is quadratic in its rows, and
    background alone is often > 90% of a slice — which reads their count from the device.
    """
    batch, dim = embeddings.shape[:2]
    flat_labels = labels.reshape(batch, -1)
    if anchors_per_class is not None and num_classes is not None:
        first_class = 0 if include_background else BACKGROUND + 1
        pixel, filled = _anchor_slots(labels, usable, anchors_per_class, first_class, num_classes, generator)
        rows = embeddings.flatten(2).gather(2, pixel[:, None, :].expand(-1, dim, -1)).transpose(1, 2)
        row_labels = torch.where(filled, flat_labels.gather(1, pixel), ignore_index).reshape(-1)
        row_weights = None if weights is None else weights.gather(1, pixel).reshape(-1)
        return rows.reshape(-1, dim), row_labels, row_weights
    anchors = usable if anchors_per_class is None else sample_anchors(labels, usable, anchors_per_class, generator)
    index = anchors.reshape(-1).nonzero().squeeze(1)
    if index.numel() == 0:
        # No usable pixel: one row that takes no part keeps the call (and any collective) uniform.
        index = index.new_zeros(1)
    row_labels = torch.where(anchors.reshape(-1)[index], flat_labels.reshape(-1)[index], ignore_index)
    rows = embeddings.permute(0, 2, 3, 1).reshape(-1, dim)[index]
    return rows, row_labels, None if weights is None else weights.reshape(-1)[index]


class PseudoLabelContrast(LossModule, TemperatureModule):
    """Module form of :func:`pseudo_label_contrast` (same settings, keyword-only, and formulas);
    ``forward(embeddings, labels, confidence=None, pair_index=None, generator=None)``.

    Typical use is ``loss = seg_loss(logits_l, y_l) + 0.1 * contrast(emb, labels, confidence)``
    with ground truth on the labeled images and :func:`contrastkit.pseudo_labels` on the rest.
    """

    function = staticmethod(pseudo_label_contrast)
    check_settings = staticmethod(_check_settings)
    per_call = ("generator",)
