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

import torch

from . import _validation as v
from ._temperature import TemperatureModule
from ._validation import check_flag, compute_dtype
from .core import info_nce
from .distributed import gather_keys
from .labels import check_label_map, downsample_labels, resize_nearest

MODES = ("prototype", "pixel")
BACKGROUND = 0


def _check_options(temperature, mode, anchors_per_class, include_background, ignore_index,
                   confidence_threshold, num_classes):
    v.check_temperature(temperature)
    v.check_choice("mode", mode, MODES)
    if anchors_per_class is not None and (
        isinstance(anchors_per_class, bool) or not isinstance(anchors_per_class, int) or anchors_per_class < 1
    ):
        raise ValueError(f"anchors_per_class must be None or a positive int; got {anchors_per_class!r}")
    if not isinstance(include_background, bool):
        raise TypeError(f"include_background must be a bool; got {type(include_background).__name__}")
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


def _check_values(embeddings, labels, confidence, pair_index, ignore_index, num_classes):
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contains NaN or Inf")
    bad = (labels < 0) & (labels != ignore_index)
    if num_classes is not None:
        bad |= (labels >= num_classes) & (labels != ignore_index)
    if bad.any():
        expected = f"class ids in [0, {num_classes})" if num_classes is not None else "non-negative class ids"
        raise ValueError(f"labels must be {expected} or ignore_index={ignore_index}; "
                         f"found {int(labels[bad][0])}")
    if confidence is not None and not ((confidence >= 0) & (confidence <= 1)).all():
        raise ValueError("confidence must lie in [0, 1] (and not be NaN)")
    if pair_index is not None and ((pair_index < 0) | (pair_index >= labels.shape[0])).any():
        raise ValueError(f"pair_index values must be image indices in [0, {labels.shape[0]})")


def sample_anchors(labels: torch.Tensor, usable: torch.Tensor, per_class: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask of ``min(per_class, count)`` pixels drawn uniformly without replacement from the
    usable pixels of each (image, class) of a (B, H, W) label map."""
    batch = labels.shape[0]
    flat = labels.reshape(batch, -1)
    cells = torch.nonzero(usable.reshape(batch, -1))
    if cells.shape[0] == 0:
        return torch.zeros_like(usable)
    image, pixel = cells[:, 0], cells[:, 1]
    cls = flat[image, pixel]
    # Shuffle the pixels, then a stable sort by (image, class) keeps each group's order random:
    # the first per_class of every group are a uniform sample without replacement.
    rand_device = generator.device if generator is not None else labels.device
    noise = torch.rand(cells.shape[0], generator=generator, device=rand_device)
    order = torch.argsort(noise.to(labels.device))
    group = (image * (int(cls.max()) + 1) + cls)[order]
    by_group = torch.argsort(group, stable=True)
    order, group = order[by_group], group[by_group]
    first = torch.ones_like(group, dtype=torch.bool)
    first[1:] = group[1:] != group[:-1]
    position = torch.arange(group.shape[0], device=group.device)
    group_start = torch.cummax(torch.where(first, position, 0), dim=0).values
    chosen = order[position - group_start < per_class]
    mask = torch.zeros(batch, flat.shape[1], dtype=torch.bool, device=labels.device)
    mask[image[chosen], pixel[chosen]] = True
    return mask.reshape(usable.shape)


def _prototype_keys(rows, labels, usable, pair_index, num_classes, ignore_index):
    """The class means of each image and of its pair, grouped by the anchor image.

    Every (image, class) slot is a key, so shapes never depend on the values (no host
    synchronisation; ``torch.compile`` traces it): a class absent from an image, and the pair's
    copy of a self-paired image's means, are labelled ``ignore_index`` and take no part.
    """
    batch, pixels = labels.shape[0], labels[0].numel()
    image = torch.arange(batch, device=rows.device).repeat_interleave(pixels)
    slot = image * num_classes + torch.where(usable, labels, 0).reshape(-1)
    weight = usable.reshape(-1).to(rows.dtype)
    sums = rows.new_zeros(batch * num_classes, rows.shape[1]).index_add(0, slot, rows * weight[:, None])
    counts = rows.new_zeros(batch * num_classes).index_add(0, slot, weight)
    means = (sums / counts.clamp_min(1)[:, None]).view(batch, num_classes, -1)

    own = torch.arange(batch, device=rows.device)
    classes = torch.arange(num_classes, device=rows.device).expand(batch, num_classes)
    present = counts.view(batch, num_classes) > 0
    own_labels = torch.where(present, classes, ignore_index)
    pair_labels = torch.where(present[pair_index] & (pair_index != own)[:, None], classes, ignore_index)
    keys = torch.cat([means, means[pair_index]]).reshape(2 * batch * num_classes, -1)
    key_labels = torch.cat([own_labels, pair_labels]).reshape(-1)
    key_groups = own.repeat_interleave(num_classes).repeat(2)
    return keys, key_labels, key_groups


def pseudo_label_contrast(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    confidence: torch.Tensor | None = None,
    pair_index: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.1,
    mode: str = "prototype",
    anchors_per_class: int | None = None,
    include_background: bool = False,
    ignore_index: int = -1,
    confidence_threshold: float | None = None,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Local pseudo-label contrast; see the module docstring for the formulas.

    Args:
        embeddings: (B, D, H, W) pixel embeddings (e.g. a 1×1-conv head on the decoder output).
        labels: (B, h, w) integer ground truth or pseudo-labels. If (h, w) ≠ (H, W) they are
            resized to (H, W) by nearest-neighbour sampling (:func:`downsample_labels`).
        confidence: optional (B, h, w) values in [0, 1], resized like ``labels``. Pixels below
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
        include_background: whether class 0 takes part (the original uses foreground only).
        ignore_index: label of pixels that take no part.
        confidence_threshold: None or a value in [0, 1]; used only when ``confidence`` is given.
        num_classes: if given, labels must lie in [0, num_classes) or equal ``ignore_index``. In
            prototype mode it also spares a host synchronisation (the class count is otherwise
            read from the labels), so ``torch.compile`` traces the whole loss.
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
    _check_options(temperature, mode, anchors_per_class, include_background, ignore_index,
                   confidence_threshold, num_classes)
    _check_inputs(embeddings, labels, confidence, pair_index, generator)
    check_flag("gather_distributed", gather_distributed)
    if mode == "pixel" and pair_index is not None:
        raise ValueError(
            "pair_index applies to mode='prototype' only; mode='pixel' contrasts the whole batch"
        )
    if not torch.compiler.is_compiling():
        _check_values(embeddings, labels, confidence, pair_index, ignore_index, num_classes)

    batch, _, height, width = embeddings.shape
    labels = downsample_labels(labels, (height, width)).long()
    usable = labels != ignore_index
    if not include_background:
        usable &= labels != BACKGROUND
    if confidence is not None:
        confidence = resize_nearest(confidence, (height, width))
        if confidence_threshold is not None:
            usable &= confidence >= confidence_threshold
    anchors = usable
    if anchors_per_class is not None:
        anchors = sample_anchors(labels, usable, anchors_per_class, generator)

    weights = None if confidence is None else confidence.reshape(-1)
    options = dict(temperature=temperature, normalize=True, denominator="all",
                   ignore_index=ignore_index, backend=backend)
    if mode == "pixel":
        if not bool(anchors.any()):
            return (embeddings.to(compute_dtype(embeddings.dtype)) * 0).sum()
        # Gather the anchors (all usable pixels unless sampled) first: the core op's cost is
        # quadratic in its rows, and background alone is often > 90% of a slice.
        keep = anchors.reshape(-1)
        rows = embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])[keep]
        row_labels = labels.reshape(-1)[keep]
        row_weights = None if weights is None else weights[keep]
        if gather_distributed:
            keys, key_labels, offset = gather_keys(rows, row_labels)
            return info_nce(rows, keys, labels=row_labels, key_labels=key_labels, self_key_offset=offset,
                            weights=row_weights, **options)
        return info_nce(rows, labels=row_labels, weights=row_weights, **options)

    # Prototype mode costs O(pixels x classes): every pixel is a query, the non-anchors ignored.
    rows = embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])
    rows = rows.to(compute_dtype(rows.dtype))  # class means of half inputs are summed in fp32
    if pair_index is None:
        pair_index = torch.arange(batch, device=labels.device)
    if num_classes is None:
        num_classes = max(int(labels[usable].max()) + 1, 1) if bool(usable.any()) else 1
    keys, key_labels, key_groups = _prototype_keys(rows, labels, usable, pair_index.long(), num_classes,
                                                   ignore_index)
    image = torch.arange(batch, device=labels.device).repeat_interleave(height * width)
    anchor_labels = torch.where(anchors, labels, ignore_index).reshape(-1)
    return info_nce(rows, keys, labels=anchor_labels, key_labels=key_labels, groups=image, key_groups=key_groups,
                    weights=weights, **options)


class PseudoLabelContrast(TemperatureModule):
    """Module form of :func:`pseudo_label_contrast` (same arguments and formulas).

    Typical use is ``loss = seg_loss(logits_l, y_l) + 0.1 * contrast(emb, labels, confidence)``
    with ground truth on the labeled images and :func:`contrastkit.pseudo_labels` on the rest.
    """

    def __init__(self, temperature: float | torch.Tensor = 0.1, mode: str = "prototype",
                 anchors_per_class: int | None = None, include_background: bool = False,
                 ignore_index: int = -1,
                 confidence_threshold: float | None = None, num_classes: int | None = None,
                 gather_distributed: bool = False, backend: str = "auto", learnable_temperature: bool = False):
        super().__init__(temperature, learnable_temperature)
        _check_options(temperature, mode, anchors_per_class, include_background, ignore_index,
                       confidence_threshold, num_classes)
        v.check_choice("backend", backend, v.BACKENDS)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        self.mode = mode
        self.anchors_per_class = anchors_per_class
        self.include_background = include_background
        self.ignore_index = ignore_index
        self.confidence_threshold = confidence_threshold
        self.num_classes = num_classes
        self.backend = backend

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                confidence: torch.Tensor | None = None, pair_index: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        return pseudo_label_contrast(
            embeddings, labels, confidence, pair_index,
            temperature=self.temperature, mode=self.mode, anchors_per_class=self.anchors_per_class,
            include_background=self.include_background, ignore_index=self.ignore_index,
            confidence_threshold=self.confidence_threshold, num_classes=self.num_classes,
            generator=generator, gather_distributed=self.gather_distributed, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"{self.temperature_repr()}, mode={self.mode!r}, "
                f"anchors_per_class={self.anchors_per_class}, "
                f"include_background={self.include_background}, ignore_index={self.ignore_index}, "
                f"confidence_threshold={self.confidence_threshold}, num_classes={self.num_classes}")
