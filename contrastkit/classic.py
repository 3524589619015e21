"""The classic contrastive losses the segmentation methods build on: NT-Xent, SupCon, PatchNCE."""

from __future__ import annotations

import torch

from . import _validation as v
from ._loss_module import LossModule
from ._temperature import TemperatureModule
from ._validation import check_flag, check_same_maps
from .core import info_nce
from .distributed import gather_keys, rank_offset
from .labels import check_labels_format, index_label_map, one_hot_value_check
from .queue import MemoryQueue, append_queue


def _global_keys(rows: torch.Tensor, labels: torch.Tensor, gather_distributed: bool):
    """(keys, key_labels, self_offset): the global batch under DDP, the local one otherwise."""
    if gather_distributed:
        return gather_keys(rows, labels)
    return rows, labels, 0


@v.settings_check
def _check_nt_xent_settings(reduction, gather_distributed, backend) -> None:
    """The settings checks of :func:`nt_xent_loss`, which :class:`NTXentLoss` runs at construction."""
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    v.check_choice("backend", backend, v.BACKENDS)
    check_flag("gather_distributed", gather_distributed)


@v.embedding_names("z1 or z2", "z1, z2, their copies from other ranks or the queue's keys")
def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 0.5,
    normalize: bool = True,
    reduction: str = "mean",
    gather_distributed: bool = False,
    queue: MemoryQueue | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""NT-Xent (SimCLR, Chen et al. 2020) over two views ``z1``, ``z2`` of shape (N, D).

    Each of the 2N embeddings has its other view as its positive and the other 2N - 2 as
    negatives: :math:`\ell_i = -\log \frac{e^{s_{i,p(i)}}}{\sum_{k \ne i} e^{s_{ik}}}`, averaged
    over the 2N anchors. Queue keys are extra negatives. ``reduction="none"`` gives the 2N
    per-anchor losses, the anchors of ``z1`` first.
    """
    _check_nt_xent_settings(reduction, gather_distributed, backend)
    check_same_maps("z1", z1, "z2", z2, 2, "(N, D) embeddings")
    n = z1.shape[0]
    rows = torch.cat([z1, z2])
    first_sample = rank_offset(n, z1.device) if gather_distributed else 0
    samples = torch.arange(first_sample, first_sample + n, device=z1.device)
    labels = torch.cat([samples, samples])
    keys, key_labels, self_offset = _global_keys(rows, labels, gather_distributed)
    keys, key_labels, _ = append_queue(queue, keys, key_labels, labels=labels)
    return info_nce(
        rows, keys, labels=labels, key_labels=key_labels, self_key_offset=self_offset,
        temperature=temperature, normalize=normalize, denominator="all", reduction=reduction,
        backend=backend,
    )


@v.settings_check
def _check_supcon_settings(denominator, reduction, gather_distributed, backend, labels_format) -> None:
    """The settings checks of :func:`supcon_loss`, which :class:`SupConLoss` runs at construction."""
    check_labels_format(labels_format)
    v.check_choice("denominator", denominator, v.DENOMINATORS)
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    v.check_choice("backend", backend, v.BACKENDS)
    check_flag("gather_distributed", gather_distributed)


@v.embedding_names("features", "features, their copies from other ranks or the queue's keys")
def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.1,
    denominator: str = "all",
    normalize: bool = True,
    ignore_index: int = -1,
    reduction: str = "mean",
    gather_distributed: bool = False,
    queue: MemoryQueue | None = None,
    backend: str = "auto",
    labels_format: str = "index",
) -> torch.Tensor:
    r"""Supervised contrastive loss (Khosla et al. 2020, :math:`\mathcal{L}^{sup}_{out}`).

    Args:
        features: (N, D), or (N, V, D) for V views of each sample (flattened view-major, as in
            the reference code: all samples of view 0, then view 1, ...), or a (B, C, H, W)
            feature map whose pixels are the samples (pixel-level SupCon; the memory-lean
            backends never hold the pixels' similarity matrix).
        labels: (N,) class ids — (B, H, W) or (B, 1, H, W) for a map; a sample labelled
            ``ignore_index`` takes no part. ``None`` (needs views) makes every sample its own
            class: the SimCLR loss over V views.
        denominator: ``"all"`` (the paper), ``"each_positive"`` or ``"negatives"``.
        queue: a :class:`MemoryQueue` holding labels; its keys with an anchor's label are
            positives, the others negatives.
        labels_format: for a feature map, ``"index"`` — (B, H, W) or (B, 1, H, W) class ids — or
            ``"one_hot"`` — a (B, K, H, W) one-hot map (a pixel with no 1 is ``ignore_index``), as
            :class:`PseudoLabelContrast` takes them.

    Anchors without a positive contribute nothing; **a batch with no positive pair gives
    exactly 0** (attached to the graph). ``reduction="none"`` returns (N,), (N, V) or (B, H, W).
    """
    _check_supcon_settings(denominator, reduction, gather_distributed, backend, labels_format)
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor; got {type(features).__name__}")
    if features.dim() == 4:  # a (B, C, H, W) map: every pixel a sample of its label's class
        if labels is None:
            raise ValueError("labels is required for (B, C, H, W) feature maps: (B, H, W) or (B, 1, H, W) class ids")
        b, _, h, w = features.shape
        one_hot = labels_format == "one_hot"
        if not isinstance(labels, torch.Tensor) or (labels.shape[0], *labels.shape[-2:]) != (b, h, w) or (
                not one_hot and labels.shape not in ((b, h, w), (b, 1, h, w))):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            expected = "(B, K, H, W) one-hot" if one_hot else f"(B, H, W) = {(b, h, w)} or (B, 1, H, W)"
            raise ValueError(f"labels for a (B, C, H, W) = {tuple(features.shape)} map must be {expected}; got {got}")
        if one_hot and v.value_checks_enabled(labels.device):
            v.raise_first_failure([one_hot_value_check("labels", v.plain(labels))])
        labels, _ = index_label_map("labels", labels, labels_format, ignore_index)
        loss = supcon_loss(v.as_rows(features), labels.reshape(-1), temperature=temperature,
                           denominator=denominator, normalize=normalize, ignore_index=ignore_index,
                           reduction=reduction, gather_distributed=gather_distributed, queue=queue, backend=backend)
        return loss.reshape(b, h, w) if reduction == "none" else loss
    if features.dim() not in (2, 3):
        raise ValueError(f"features must be (N, D), (N, V, D) or a (B, C, H, W) map; got shape "
                         f"{tuple(features.shape)}")
    if labels_format != "index":
        raise ValueError("labels_format='one_hot' applies to (B, C, H, W) feature maps; (N, D) and (N, V, D) "
                         "features take (N,) class ids")
    n = features.shape[0]
    views = features.shape[1] if features.dim() == 3 else 1
    rows = features
    if features.dim() == 3:  # view-major: all samples of view 0, then view 1, ...
        rows = features.transpose(0, 1).reshape(views * n, features.shape[-1])
    if labels is None:
        if features.dim() == 2:
            raise ValueError("labels is required for (N, D) features; labels=None (each sample its own "
                             "class) needs (N, V, D) features with V >= 2 views")
        first_sample = rank_offset(n, features.device) if gather_distributed else 0
        labels = torch.arange(first_sample, first_sample + n, device=features.device)
        queue_labels = None  # every sample its own class: queue keys are negatives
    else:
        labels = v.check_index_vector("labels", labels, n, features.device, "sample")
        queue_labels = "supcon_loss with labels"
    row_labels = labels.repeat(views)
    keys, key_labels, self_offset = _global_keys(rows, row_labels, gather_distributed)
    keys, key_labels, _ = append_queue(queue, keys, key_labels, labels=row_labels, use_queue_labels=queue_labels,
                                       ignore_index=ignore_index)
    loss = info_nce(
        rows, keys, labels=row_labels, key_labels=key_labels, self_key_offset=self_offset,
        temperature=temperature, normalize=normalize, denominator=denominator,
        ignore_index=ignore_index, reduction=reduction, backend=backend,
    )
    if reduction == "none" and features.dim() == 3:
        loss = loss.reshape(views, n).T
    return loss


def sample_locations(batch: int, locations: int, num_patches: int | None, device: torch.device,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, P) distinct location indices per image, drawn independently per image.

    ``num_patches=None`` or at least ``locations`` gives every location, in order.
    """
    if num_patches is None or num_patches >= locations:
        return torch.arange(locations, device=device).expand(batch, locations)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    draw_device = generator.device if generator is not None else device
    scores = torch.rand(batch, locations, generator=generator, device=draw_device)
    return scores.argsort(dim=1)[:, :num_patches].to(device)


@v.settings_check
def _check_patch_nce_settings(num_patches, gather_distributed, reduction, backend) -> None:
    """The settings checks of :func:`patch_nce_loss`, which :class:`PatchNCELoss` runs at construction."""
    if num_patches is not None and (isinstance(num_patches, bool) or not isinstance(num_patches, int)
                                    or num_patches < 1):
        raise ValueError(f"num_patches must be a positive int or None; got {num_patches!r}")
    check_flag("gather_distributed", gather_distributed)
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    v.check_choice("backend", backend, v.BACKENDS)


@v.embedding_names("feat_q", "feat_k or the queue's keys")
def patch_nce_loss(
    feat_q: torch.Tensor,
    feat_k: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 0.07,
    num_patches: int | None = 256,
    generator: torch.Generator | None = None,
    normalize: bool = True,
    gather_distributed: bool = False,
    queue: MemoryQueue | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""PatchNCE (CUT, Park et al. 2020) between feature maps (B, C, H, W) at the same locations.

    ``num_patches`` locations are drawn per image (all of them when ``None`` or when the map
    is smaller). A query's positive is the key at its location; its negatives are the keys at
    the other sampled locations of the same image (and the queue's keys). Keys are detached.
    The loss is the mean over the B·P queries. ``gather_distributed`` is accepted for a uniform
    interface and changes nothing: negatives come from the same image, on the same rank.
    """
    _check_patch_nce_settings(num_patches, gather_distributed, reduction, backend)
    check_same_maps("feat_q", feat_q, "feat_k", feat_k, 4, "a (B, C, H, W) feature map")
    b, c, h, w = feat_q.shape
    where = sample_locations(b, h * w, num_patches, feat_q.device, generator)[..., None].expand(-1, -1, c)
    queries = feat_q.flatten(2).transpose(1, 2).gather(1, where).reshape(-1, c)
    keys = feat_k.detach().flatten(2).transpose(1, 2).gather(1, where).reshape(-1, c)
    # One call for the batch: each query's own location is its positive, the other sampled
    # locations of its image (its group) and the queue's keys (shared by all) its negatives.
    options = dict(temperature=temperature, normalize=normalize, denominator="all",
                   reduction="none" if reduction == "none" else "sum", backend=backend)
    if queue is None:  # paired views in B equal blocks, one per image
        return _patch_reduction(info_nce(queries, keys, groups=b, **options), reduction, b, queries.shape[0])
    locations = torch.arange(queries.shape[0], device=feat_q.device)
    images = torch.div(locations, queries.shape[0] // b, rounding_mode="floor")
    keys, key_labels, key_groups = append_queue(queue, keys, locations, images, labels=locations)
    total = info_nce(queries, keys, labels=locations, key_labels=key_labels, groups=images, key_groups=key_groups,
                     **options)
    return _patch_reduction(total, reduction, b, queries.shape[0])


def _patch_reduction(total: torch.Tensor, reduction: str, images: int, queries: int) -> torch.Tensor:
    """The mean over the B·P queries (all contribute), their sum, or each query's loss as (B, P)."""
    if reduction == "none":
        return total.reshape(images, -1)
    return total if reduction == "sum" else total / queries


class NTXentLoss(LossModule, TemperatureModule):
    """Module form of :func:`nt_xent_loss`, with its settings (keyword-only); ``forward(z1, z2, queue=None)``.

    ``temperature`` may be a tensor, and ``learnable_temperature=True`` learns τ in log space
    (see :class:`contrastkit.TemperatureModule`).
    """

    function = staticmethod(nt_xent_loss)
    check_settings = staticmethod(_check_nt_xent_settings)
    per_call = ("queue",)


class SupConLoss(LossModule, TemperatureModule):
    """Module form of :func:`supcon_loss`, with its settings (keyword-only);
    ``forward(features, labels=None, queue=None)``."""

    function = staticmethod(supcon_loss)
    check_settings = staticmethod(_check_supcon_settings)
    per_call = ("queue",)


class PatchNCELoss(LossModule, TemperatureModule):
    """Module form of :func:`patch_nce_loss`, with its settings (keyword-only);
    ``forward(feat_q, feat_k, generator=None, queue=None)``."""

    function = staticmethod(patch_nce_loss)
    check_settings = staticmethod(_check_patch_nce_settings)
    per_call = ("generator", "queue")
