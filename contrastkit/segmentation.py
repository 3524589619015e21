"""Supervised segmentation losses the example pipelines pair with the contrastive terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import get_world_size, is_distributed, sum_over_ranks


def _check_logits_target(logits, target, binary: bool) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating torch.Tensor")
    if logits.dim() < 3:
        raise ValueError(f"logits must be (B, K, *spatial); got shape {tuple(logits.shape)}")
    if not isinstance(target, torch.Tensor):
        raise TypeError("target must be a torch.Tensor")
    if binary:
        if logits.shape[1] != 1:
            raise ValueError(f"binary logits must have one channel; got shape {tuple(logits.shape)}")
        if target.shape != logits.shape:
            raise ValueError(f"target must have the logits' shape {tuple(logits.shape)}; got {tuple(target.shape)}")
    else:
        if target.is_floating_point():
            raise TypeError(f"target must hold integer class ids; got {target.dtype}")
        if target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(
                f"target must be (B, *spatial) = {tuple(logits.shape[:1] + logits.shape[2:])}; "
                f"got {tuple(target.shape)}"
            )


def soft_dice_loss(probabilities: torch.Tensor, one_hot: torch.Tensor, valid: torch.Tensor | None = None,
                   smooth: float = 1.0, gather_distributed: bool = False) -> torch.Tensor:
    """1 − mean over classes of (2|P∩T| + s) / (|P| + |T| + s), summed over the batch and space.

    ``valid`` (broadcastable to the inputs) excludes ignored pixels. A class absent from both the
    prediction and the target scores Dice 1 thanks to the smoothing term.

    ``gather_distributed=True`` sums |P∩T|, |P| and |T| over all ranks
    (:func:`contrastkit.distributed.sum_over_ranks`): every rank returns the Dice loss of the
    global batch, as one process holding it would, and DDP's gradient averaging yields its
    gradient. Without it each rank's Dice covers its own share of the batch only.
    """
    if valid is not None:
        probabilities = probabilities * valid
        one_hot = one_hot * valid
    dims = (0,) + tuple(range(2, probabilities.dim()))
    intersection = (probabilities * one_hot).sum(dims)
    total = probabilities.sum(dims) + one_hot.sum(dims)
    if gather_distributed and is_distributed():
        intersection, total = sum_over_ranks(torch.stack([intersection, total])).unbind(0)
    return 1 - ((2 * intersection + smooth) / (total + smooth)).mean()


def _global_mean(values: torch.Tensor, count: int) -> torch.Tensor:
    """This rank's term of the mean over all ranks' ``count`` values: sum · world / global count.

    Its mean over ranks is the global mean, whatever the per-rank counts, and DDP's averaging
    of the gradients gives the global mean's gradient."""
    counts = sum_over_ranks(torch.tensor(float(count), dtype=torch.float64, device=values.device))
    world = float(get_world_size())
    return values.sum() * (world / counts.clamp_min(1.0)).to(values.dtype)


def bce_dice_loss(logits: torch.Tensor, mask: torch.Tensor, smooth: float = 1.0,
                  gather_distributed: bool = False) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice for (B, 1, H, W) logits and a {0, 1} mask of that shape.

    ``gather_distributed=True`` (under DDP): the cross-entropy is this rank's term of the mean
    over every pixel of the global batch and the Dice is the global batch's (see
    :func:`soft_dice_loss`), so the mean of the per-rank losses equals the loss one process
    computes on the whole batch, and so do the averaged gradients.
    """
    _check_logits_target(logits, mask, binary=True)
    mask = mask.to(logits.dtype)
    if gather_distributed and is_distributed():
        bce = _global_mean(F.binary_cross_entropy_with_logits(logits, mask, reduction="none"), mask.numel())
    else:
        bce = F.binary_cross_entropy_with_logits(logits, mask)
    return bce + soft_dice_loss(torch.sigmoid(logits), mask, smooth=smooth, gather_distributed=gather_distributed)


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -1,
                 smooth: float = 1.0, gather_distributed: bool = False) -> torch.Tensor:
    """Cross-entropy plus soft Dice over all K classes for (B, K, …) logits and (B, …) labels.

    Pixels labelled ``ignore_index`` count in neither term; a batch with every pixel ignored
    gives 0. ``gather_distributed=True`` (under DDP) makes both terms those of the global
    batch, as in :func:`bce_dice_loss` (then every rank must call it, even one whose pixels are
    all ignored).
    """
    _check_logits_target(logits, labels, binary=False)
    num_classes = logits.shape[1]
    valid = labels != ignore_index
    if bool(((labels < 0) | (labels >= num_classes))[valid].any()):
        raise ValueError(f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}")
    gather = gather_distributed and is_distributed()
    if not gather and not bool(valid.any()):
        return logits.sum() * 0.0
    safe = torch.where(valid, labels, 0)
    per_pixel = F.cross_entropy(logits, safe, reduction="none")[valid]
    cross_entropy = _global_mean(per_pixel, per_pixel.numel()) if gather else per_pixel.mean()
    one_hot = F.one_hot(safe, num_classes).movedim(-1, 1).to(logits.dtype)
    dice = soft_dice_loss(logits.softmax(dim=1), one_hot, valid.unsqueeze(1).to(logits.dtype), smooth, gather)
    return cross_entropy + dice
