"""The classic contrastive losses the segmentation methods build on: NT-Xent, SupCon, PatchNCE."""

from __future__ import annotations

import torch
from torch import nn

from . import _validation as v
from .core import info_nce
from .distributed import gather_keys, rank_offset
from .queue import MemoryQueue, queue_contents


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def check_same_maps(name_a: str, a, name_b: str, b, dims: int, layout: str) -> None:
    """Two tensors with the same shape, dtype and device, of ``dims`` dimensions."""
    for name, x in ((name_a, a), (name_b, b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        if x.dim() != dims:
            raise ValueError(f"{name} must be {layout}; got shape {tuple(x.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} has dtype {a.dtype} but {name_b} has {b.dtype}")


def _global_keys(rows: torch.Tensor, labels: torch.Tensor, gather_distributed: bool):
    """(keys, key_labels, self_offset): the global batch under DDP, the local one otherwise."""
    if gather_distributed:
        return gather_keys(rows, labels)
    return rows, labels, 0


def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: float = 0.5,
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
    check_same_maps("z1", z1, "z2", z2, 2, "(N, D) embeddings")
    check_flag("gather_distributed", gather_distributed)
    n = z1.shape[0]
    rows = torch.cat([z1, z2])
    first_sample = rank_offset(n, z1.device) if gather_distributed else 0
    samples = torch.arange(first_sample, first_sample + n, device=z1.device)
    labels = torch.cat([samples, samples])
    keys, key_labels, self_offset = _global_keys(rows, labels, gather_distributed)
    queued, _ = queue_contents(queue, rows)
    if queued is not None:
        # A label that no sample has: queue keys are negatives of every anchor.
        unused = torch.full((queued.shape[0],), key_labels.shape[0], device=rows.device, dtype=torch.long)
        keys, key_labels = torch.cat([keys, queued]), torch.cat([key_labels, unused])
    return info_nce(
        rows, keys, labels=labels, key_labels=key_labels, self_key_offset=self_offset,
        temperature=temperature, normalize=normalize, denominator="all", reduction=reduction,
        backend=backend,
    )


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 0.1,
    denominator: str = "all",
    normalize: bool = True,
    ignore_index: int = -1,
    reduction: str = "mean",
    gather_distributed: bool = False,
    queue: MemoryQueue | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Supervised contrastive loss (Khosla et al. 2020, :math:`\mathcal{L}^{sup}_{out}`).

    Args:
        features: (N, D), or (N, V, D) for V views of each sample (flattened view-major, as in
            the reference code: all samples of view 0, then view 1, ...).
        labels: (N,) class ids; a sample labelled ``ignore_index`` takes no part. ``None``
            (needs views) makes every sample its own class: the SimCLR loss over V views.
        denominator: ``"all"`` (the paper), ``"each_positive"`` or ``"negatives"``.
        queue: a :class:`MemoryQueue` holding labels; its keys with an anchor's label are
            positives, the others negatives.

    Anchors without a positive contribute nothing; **a batch with no positive pair gives
    exactly 0** (attached to the graph). ``reduction="none"`` returns (N,) or (N, V).
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor; got {type(features).__name__}")
    if features.dim() not in (2, 3):
        raise ValueError(f"features must be (N, D) or (N, V, D); got shape {tuple(features.shape)}")
    check_flag("gather_distributed", gather_distributed)
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
        queue_needs_labels = None
    else:
        labels = v.check_index_vector("labels", labels, n, features.device, "sample")
        queue_needs_labels = "supcon_loss with labels"
    row_labels = labels.repeat(views)
    keys, key_labels, self_offset = _global_keys(rows, row_labels, gather_distributed)
    queued, queued_labels = queue_contents(queue, rows, need_labels=queue_needs_labels)
    if queued is not None:
        if queue_needs_labels is None:
            queued_labels = torch.full((queued.shape[0],), int(key_labels.max()) + 1, device=rows.device)
        keys, key_labels = torch.cat([keys, queued]), torch.cat([key_labels, queued_labels])
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


def patch_nce_loss(
    feat_q: torch.Tensor,
    feat_k: torch.Tensor,
    *,
    temperature: float = 0.07,
    num_patches: int | None = 256,
    generator: torch.Generator | None = None,
    normalize: bool = True,
    gather_distributed: bool = False,
    queue: MemoryQueue | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""PatchNCE (CUT, Park et al. 2020) between feature maps (B, C, H, W) at the same locations.

    ``num_patches`` locations are drawn per image (all of them when ``None`` or when the map
    is smaller). A query's positive is the key at its location; its negatives are the keys at
    the other sampled locations of the same image (and the queue's keys). Keys are detached.
    The loss is the mean over the B·P queries. ``gather_distributed`` is accepted for a uniform
    interface and changes nothing: negatives come from the same image, on the same rank.
    """
    check_same_maps("feat_q", feat_q, "feat_k", feat_k, 4, "a (B, C, H, W) feature map")
    check_flag("gather_distributed", gather_distributed)
    if num_patches is not None and (isinstance(num_patches, bool) or not isinstance(num_patches, int)
                                    or num_patches < 1):
        raise ValueError(f"num_patches must be a positive int or None; got {num_patches!r}")
    b, c, h, w = feat_q.shape
    where = sample_locations(b, h * w, num_patches, feat_q.device, generator)[..., None].expand(-1, -1, c)
    queries = feat_q.flatten(2).transpose(1, 2).gather(1, where)
    keys = feat_k.detach().flatten(2).transpose(1, 2).gather(1, where)
    p = queries.shape[1]
    labels = torch.arange(p, device=feat_q.device)
    key_labels = labels
    queued, _ = queue_contents(queue, queries)
    if queued is not None:
        key_labels = torch.cat([labels, torch.full((queued.shape[0],), p, device=feat_q.device)])
    total = 0.0
    # One image at a time: the negatives of a query are its own image's keys only.
    for image in range(b):
        image_keys = keys[image] if queued is None else torch.cat([keys[image], queued])
        total = total + info_nce(
            queries[image], image_keys, labels=labels, key_labels=key_labels, temperature=temperature,
            normalize=normalize, denominator="all", reduction="sum", backend=backend,
        )
    return total / (b * p)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent_loss`; ``forward(z1, z2, queue=None)``."""

    def __init__(self, temperature: float = 0.5, normalize: bool = True, reduction: str = "mean",
                 gather_distributed: bool = False, backend: str = "auto"):
        super().__init__()
        self.temperature = v.check_temperature(temperature)
        v.check_choice("reduction", reduction, v.REDUCTIONS)
        self.normalize, self.reduction, self.backend = normalize, reduction, backend
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)

    def forward(self, z1, z2, queue: MemoryQueue | None = None):
        return nt_xent_loss(z1, z2, temperature=self.temperature, normalize=self.normalize,
                            reduction=self.reduction, gather_distributed=self.gather_distributed,
                            queue=queue, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


class SupConLoss(nn.Module):
    """Module form of :func:`supcon_loss`; ``forward(features, labels=None, queue=None)``."""

    def __init__(self, temperature: float = 0.1, denominator: str = "all", normalize: bool = True,
                 ignore_index: int = -1, reduction: str = "mean", gather_distributed: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.temperature = v.check_temperature(temperature)
        v.check_choice("denominator", denominator, v.DENOMINATORS)
        v.check_choice("reduction", reduction, v.REDUCTIONS)
        self.denominator, self.normalize, self.ignore_index = denominator, normalize, ignore_index
        self.reduction, self.backend = reduction, backend
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)

    def forward(self, features, labels=None, queue: MemoryQueue | None = None):
        return supcon_loss(features, labels, temperature=self.temperature, denominator=self.denominator,
                           normalize=self.normalize, ignore_index=self.ignore_index,
                           reduction=self.reduction, gather_distributed=self.gather_distributed,
                           queue=queue, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, denominator={self.denominator!r}"


class PatchNCELoss(nn.Module):
    """Module form of :func:`patch_nce_loss`; ``forward(feat_q, feat_k, generator=None, queue=None)``."""

    def __init__(self, temperature: float = 0.07, num_patches: int | None = 256, normalize: bool = True,
                 gather_distributed: bool = False, backend: str = "auto"):
        super().__init__()
        self.temperature = v.check_temperature(temperature)
        if num_patches is not None and (isinstance(num_patches, bool) or not isinstance(num_patches, int)
                                        or num_patches < 1):
            raise ValueError(f"num_patches must be a positive int or None; got {num_patches!r}")
        self.num_patches, self.normalize, self.backend = num_patches, normalize, backend
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)

    def forward(self, feat_q, feat_k, generator: torch.Generator | None = None,
                queue: MemoryQueue | None = None):
        return patch_nce_loss(feat_q, feat_k, temperature=self.temperature, num_patches=self.num_patches,
                              generator=generator, normalize=self.normalize,
                              gather_distributed=self.gather_distributed, queue=queue, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, num_patches={self.num_patches}"
