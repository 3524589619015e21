"""Global and local contrast of Chaitanya et al., "Contrastive learning of global and local
features for medical image segmentation with limited annotations" (NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _validation as v
from ._loss_module import LossModule
from ._masks import normalized
from ._temperature import TemperatureModule
from ._validation import check_flag, check_same_maps
from .core import info_nce
from .distributed import gather_keys, get_rank
from .patches import as_grid, pool_patches
from .queue import MemoryQueue, append_queue, queued_keys

STRATEGIES = ("GR", "GD-", "GD")


def partition_of(slice_index: torch.Tensor, num_slices, num_partitions: int) -> torch.Tensor:
    """The partition of each slice when a volume of ``num_slices`` is cut into equal partitions.

    Slice i of a volume with S slices lies in partition ``floor(i * P / S)``.
    """
    return torch.div(slice_index * num_partitions, num_slices, rounding_mode="floor")


def sample_partition_slices(
    slices_per_volume: Sequence[int], num_partitions: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one slice uniformly from each partition of each volume.

    Args:
        slices_per_volume: the number of slices of each volume of the batch.
        num_partitions: P, the partitions each volume is cut into along the slice axis.

    Returns:
        ``(volume_index, partition_ids, slice_index)``, each of length ``len(slices_per_volume) * P``,
        volume-major: ``volume_index`` is the position in ``slices_per_volume``.
    """
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive int; got {num_partitions!r}")
    counts = list(slices_per_volume)
    if not counts:
        raise ValueError("slices_per_volume must name at least one volume")
    for volume, count in enumerate(counts):
        if isinstance(count, bool) or not isinstance(count, int) or count < num_partitions:
            raise ValueError(
                f"slices_per_volume[{volume}] must be an int >= num_partitions ({num_partitions}); "
                f"got {count!r}"
            )
    sizes = torch.tensor(counts, dtype=torch.long)[:, None]
    partitions = torch.arange(num_partitions)[None, :]
    # Partition p holds slices ceil(p S / P) .. ceil((p + 1) S / P) - 1.
    first = -torch.div(-partitions * sizes, num_partitions, rounding_mode="floor")
    stop = -torch.div(-(partitions + 1) * sizes, num_partitions, rounding_mode="floor")
    uniform = torch.rand(first.shape, generator=generator, dtype=torch.float64)
    slice_index = first + (uniform * (stop - first)).long().clamp_max(stop - first - 1)
    volume_index = torch.arange(len(counts))[:, None].expand_as(slice_index)
    return volume_index.reshape(-1), partitions.expand_as(slice_index).reshape(-1), slice_index.reshape(-1)


def _check_ids(z: torch.Tensor, **ids: torch.Tensor) -> list[torch.Tensor]:
    checked = []
    for name, x in ids.items():
        if x is None:
            raise ValueError(f"{name} is required")
        x = v.check_index_vector(name, x, z.shape[0], z.device, "slice embedding")
        if v.value_checks_enabled(x.device) and (x < 0).any():
            raise ValueError(f"{name} must be non-negative ids; found {int(x[x < 0][0])}")
        checked.append(x)
    return checked


@v.settings_check
def _check_global_settings(strategy, reduction, gather_distributed, backend) -> None:
    """The settings checks of :func:`global_contrast`, which :class:`GlobalContrast` runs at construction."""
    v.check_choice("strategy", strategy, STRATEGIES)
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    v.check_choice("backend", backend, v.BACKENDS)
    check_flag("gather_distributed", gather_distributed)


@v.embedding_names("z", "z, its copies from other ranks or the queue's keys")
def global_contrast(
    z: torch.Tensor,
    volume_ids: torch.Tensor,
    partition_ids: torch.Tensor,
    view_ids: torch.Tensor,
    *,
    strategy: str = "GD",
    temperature: float | torch.Tensor = 0.1,
    normalize: bool = True,
    gather_distributed: bool = False,
    queue: MemoryQueue | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Global contrast over slice embeddings ``z`` (N, D), with the ``"each_positive"`` denominator.

    A slice is identified by its (volume, partition) (and the rank that holds it); its views by
    ``view_ids``. Strategies:

    - ``"GR"``: positives are the other views of the same slice; every other slice is a negative.
    - ``"GD-"``: as GR, but slices of the same partition of other volumes are not negatives.
    - ``"GD"``: positives are all slices of the same partition (any volume, any view);
      negatives are the slices of other partitions.

    The loss is the mean over anchors with at least one positive, 0 when there is none.
    A queue must hold partition ids as labels for GD and GD-: its keys of the anchor's
    partition are positives (GD) or left out (GD-), the others negatives; for GR all queue keys
    are negatives. Under ``gather_distributed`` volume ids should be dataset-wide (for GD, equal
    partition ids across ranks are positives of each other).
    """
    _check_global_settings(strategy, reduction, gather_distributed, backend)
    if isinstance(z, torch.Tensor) and z.dim() != 2:
        raise ValueError(f"z must be (N, D) slice embeddings; got shape {tuple(z.shape)}")
    v.check_embeddings("z", z)
    z = v.as_rows(z)
    volume_ids, partition_ids, view_ids = _check_ids(
        z, volume_ids=volume_ids, partition_ids=partition_ids, view_ids=view_ids
    )
    n = z.shape[0]
    triples = torch.stack([volume_ids, partition_ids, view_ids], 1)
    if strategy != "GD" and torch.unique(triples, dim=0).shape[0] < n:
        raise ValueError("each (volume_ids, partition_ids, view_ids) triple must appear once: a slice is "
                         "identified by its volume and partition, its views by view_ids")
    ranks = torch.full((n,), get_rank() if gather_distributed else 0, device=z.device, dtype=torch.long)
    if gather_distributed:
        gathered = gather_keys(z, volume_ids, partition_ids, ranks)
    else:
        gathered = z, volume_ids, partition_ids, ranks, 0
    keys, key_volumes, key_partitions, key_ranks, self_offset = gathered
    options = dict(temperature=temperature, normalize=normalize, denominator="each_positive", reduction=reduction,
                   backend=backend)

    if strategy == "GD":
        keys, key_labels, _ = append_queue(queue, keys, key_partitions, labels=partition_ids,
                                           use_queue_labels="GlobalContrast(strategy='GD')")
        return info_nce(z, keys, labels=partition_ids, key_labels=key_labels, self_key_offset=self_offset,
                        **options)

    _, key_slices = torch.unique(torch.stack([key_ranks, key_volumes, key_partitions], 1), dim=0,
                                 return_inverse=True)
    slices = key_slices[self_offset : self_offset + n]
    if strategy == "GR":
        keys, key_slices, _ = append_queue(queue, keys, key_slices, labels=slices)
        return info_nce(z, keys, labels=slices, key_labels=key_slices, self_key_offset=self_offset, **options)
    return _gd_minus(z, slices, partition_ids, keys, key_partitions, queue, options)


def _gd_minus(z, slices, partition_ids, keys, key_partitions, queue, options):
    """GD-: an anchor's positives are the other views of its slice, its negatives every key of
    another partition; keys of its partition in other volumes take no part.

    Which keys are candidates depends on both the slice and the partition of the anchor, which
    no single group equality expresses, so each slice is one group with its own copy of the
    keys of the other partitions. The keys are this process's rows first (query i is key i: the
    views of a slice always live on one process), then, per slice, the other-partition keys of
    every process and of the queue; one core call for the batch.
    """
    keys, key_partitions, _ = append_queue(queue, keys, key_partitions, labels=partition_ids,
                                           use_queue_labels="GlobalContrast(strategy='GD-')")
    distinct, slice_of_row = torch.unique(slices, return_inverse=True)
    slice_partition = partition_ids.new_empty(distinct.shape[0]).scatter_(0, slice_of_row, partition_ids)
    slice_index, key_index = (key_partitions[None, :] != slice_partition[:, None]).nonzero(as_tuple=True)
    rows = torch.zeros_like(slices)  # label 0: the own slice's views; 1: another partition's keys
    copied = torch.ones_like(key_index)
    return info_nce(z, torch.cat([z, keys[key_index]]), labels=rows, key_labels=torch.cat([rows, copied]),
                    groups=slice_of_row, key_groups=torch.cat([slice_of_row, slice_index]), self_key_offset=0,
                    **options)


@v.settings_check
def _check_local_settings(region_grid, negatives_per_region, gather_distributed, reduction,
                          backend) -> tuple[int, int]:
    """The settings checks of :func:`local_contrast`, which :class:`LocalContrast` runs at construction;
    returns the region grid as (gh, gw)."""
    if negatives_per_region is not None and (isinstance(negatives_per_region, bool)
                                             or not isinstance(negatives_per_region, int)
                                             or negatives_per_region < 1):
        raise ValueError(f"negatives_per_region must be None or a positive int; got {negatives_per_region!r}")
    check_flag("gather_distributed", gather_distributed)
    v.check_choice("reduction", reduction, v.REDUCTIONS)
    v.check_choice("backend", backend, v.BACKENDS)
    return as_grid(region_grid)


@v.embedding_names("f1 or f2", "f1, f2 or the queue's keys")
def local_contrast(
    f1: torch.Tensor,
    f2: torch.Tensor,
    *,
    region_grid=4,
    temperature: float | torch.Tensor = 0.1,
    negatives_per_region: int | None = None,
    normalize: bool = True,
    gather_distributed: bool = False,
    queue: MemoryQueue | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Local region contrast between feature maps ``f1``, ``f2`` (B, C, H, W) of two views.

    Each map is mean-pooled onto a ``region_grid`` (:func:`contrastkit.pool_patches`), giving R
    region embeddings per view. A region's positive is the same region in the other view; its
    negatives are the other 2R - 2 regions of both views of the same image (and the queue's
    keys), or only the ``negatives_per_region`` most similar of them (hardest negatives, chosen
    without gradient). The loss is the mean over the 2·B·R regions. ``gather_distributed`` is
    accepted for a uniform interface and changes nothing: negatives come from the same image.
    """
    grid = _check_local_settings(region_grid, negatives_per_region, gather_distributed, reduction, backend)
    check_same_maps("f1", f1, "f2", f2, 4, "a (B, C, H, W) feature map")
    regions = grid[0] * grid[1]
    b = f1.shape[0]
    pooled = torch.cat([pool_patches(f1, grid).flatten(2), pool_patches(f2, grid).flatten(2)], dim=2)
    rows = pooled.transpose(1, 2)  # (B, 2R, C): view 1 regions, then view 2 regions
    queued, _ = queued_keys(queue, rows)
    extra = 0 if queued is None else queued.shape[0]
    if negatives_per_region is not None:
        available = 2 * regions - 2 + extra
        if negatives_per_region > available:
            raise ValueError(f"negatives_per_region must be None or an int in [1, {available}] "
                             f"(2R - 2 other regions + {extra} queue keys); got {negatives_per_region!r}")
    # One core call for the batch: the regions of an image are one group; queue keys are shared.
    region = torch.arange(regions, device=f1.device).repeat(2)
    flat = rows.reshape(b * 2 * regions, -1)
    options = dict(temperature=temperature, normalize=normalize, reduction="none" if reduction == "none" else "sum",
                   backend=backend)
    if negatives_per_region is None and queue is None:
        # Self-contrast in B equal blocks (one per image): region ids need only be unique within one.
        total = info_nce(flat, labels=region.repeat(b), groups=b, **options)
    elif negatives_per_region is None:
        labels = (torch.arange(b, device=f1.device)[:, None] * regions + region).reshape(-1)
        images = torch.arange(b, device=f1.device).repeat_interleave(2 * regions)
        keys, key_labels, key_groups = append_queue(queue, flat, labels, images, labels=labels)
        total = info_nce(flat, keys, labels=labels, key_labels=key_labels, groups=images, key_groups=key_groups,
                         self_key_offset=0, **options)
    else:
        total = _nearest_negatives_loss(rows, queued, negatives_per_region, normalize, options)
    if reduction == "none":  # per region: (B, 2, gh, gw), the first view's regions first
        return total.reshape(b, 2, *grid)
    return total if reduction == "sum" else total / (b * 2 * regions)


def _nearest_negatives_loss(rows, queued, k, normalize, options):
    """InfoNCE of each region against its positive (the same region in the other view) and its k
    most similar negatives among the other regions of its image and the queue, chosen without
    gradient; one core call for the batch, each query its own group of 1 + k keys."""
    b, count, dim = rows.shape
    regions = count // 2
    candidates = rows if queued is None else torch.cat([rows, queued.expand(b, -1, -1)], dim=1)
    own = torch.arange(count, device=rows.device)
    partner = (own + regions) % count
    with torch.no_grad():
        dtype = torch.promote_types(rows.dtype, torch.float32)
        q, c = rows.to(dtype), candidates.to(dtype)
        if normalize:
            q, c = normalized(q, dim=2), normalized(c, dim=2)
        similarity = q @ c.transpose(1, 2)  # (B, 2R, 2R + Q)
        similarity[:, own, own] = float("-inf")
        similarity[:, own, partner] = float("-inf")
        nearest = similarity.topk(k, dim=2).indices
    chosen = torch.cat([partner[None, :, None].expand(b, -1, 1), nearest], dim=2)  # (B, 2R, 1 + k): positive first
    keys = candidates.reshape(-1, dim)[(chosen + torch.arange(b, device=rows.device)[:, None, None]
                                        * candidates.shape[1]).reshape(-1)]
    queries = rows.reshape(-1, dim)
    key_labels = (torch.arange(k + 1, device=rows.device) > 0).long().repeat(queries.shape[0])
    labels = torch.zeros(queries.shape[0], dtype=torch.long, device=rows.device)
    return info_nce(queries, keys, labels=labels, key_labels=key_labels, groups=queries.shape[0], **options)


class GlobalContrast(LossModule, TemperatureModule):
    """Module form of :func:`global_contrast`, with its settings (keyword-only).

    ``forward(z, volume_ids, partition_ids, view_ids, queue=None)``.
    """

    function = staticmethod(global_contrast)
    check_settings = staticmethod(_check_global_settings)
    per_call = ("queue",)
    positional = ("strategy",)  # GlobalContrast("GR") reads as the strategy it is


class LocalContrast(LossModule, TemperatureModule):
    """Module form of :func:`local_contrast`, with its settings (keyword-only); ``forward(f1, f2, queue=None)``."""

    function = staticmethod(local_contrast)
    check_settings = staticmethod(_check_local_settings)
    per_call = ("queue",)
