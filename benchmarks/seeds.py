"""The seed papers' losses as their code wrote them, in plain PyTorch, written from the formulas.

They are benchmark peers: each computes the same value as the contrastkit loss it is compared
with (``test_agreement.py`` checks that), the way the original implementations shape the work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_nce(global_map: torch.Tensor, local_rows: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """CLCC's cross-level contrast in the PatchNCE form (CUT): per image, a batched matrix product
    of its cells against its own patches, the positive logit first and the diagonal masked out of
    the negatives, then a cross-entropy with target 0.

    The original fills the masked diagonal with -10 before dividing by τ; that contributes
    e^(-10/τ) ≈ 1e-62 of the denominator at τ = 0.07, so the value equals the masked InfoNCE's.
    Rows are L2-normalised (the original used L1; contrastkit deliberately uses L2).
    """
    b, c, gh, gw = global_map.shape
    cells = gh * gw
    q = F.normalize(global_map.flatten(2).transpose(1, 2), dim=2)  # (B, cells, C)
    k = F.normalize(local_rows.detach().reshape(b, cells, c), dim=2)
    l_pos = (q * k).sum(dim=2, keepdim=True)
    l_neg = torch.bmm(q, k.transpose(1, 2))
    diagonal = torch.eye(cells, dtype=torch.bool, device=q.device)[None]
    l_neg = l_neg.masked_fill(diagonal, -10.0)
    logits = torch.cat([l_pos, l_neg], dim=2).flatten(0, 1) / temperature
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target)


def prototype_loop(embeddings: torch.Tensor, labels: torch.Tensor, pair_index: torch.Tensor,
                   temperature: float = 0.1) -> torch.Tensor:
    """The pseudo-label prototype loss as the original code loops it: per image, per class.

    Image a is paired with b = pair_index[a]. The keys are the class means (of the raw
    embeddings) of every foreground class present in a and in b; an anchor pixel of class c in a
    has the means of class c as positives and all the keys as its denominator. The loss is the
    mean over all foreground anchors of the batch.
    """
    dtype = torch.promote_types(embeddings.dtype, torch.float32)  # half inputs are summed in fp32
    total = embeddings.new_zeros((), dtype=dtype)
    anchors = 0
    for a in range(embeddings.shape[0]):
        b = int(pair_index[a])
        means, mean_classes = [], []
        for x in dict.fromkeys((a, b)):  # a self-paired image gives its means once
            for c in torch.unique(labels[x]).tolist():
                if c > 0:
                    means.append(embeddings[x][:, labels[x] == c].to(dtype).mean(dim=1))
                    mean_classes.append(c)
        if not means:
            continue
        keys = F.normalize(torch.stack(means), dim=1)
        mean_classes = torch.tensor(mean_classes, device=embeddings.device)
        for c in torch.unique(labels[a]).tolist():
            if c <= 0:
                continue
            pixels = F.normalize(embeddings[a][:, labels[a] == c].T.to(dtype), dim=1)
            logits = pixels @ keys.T / temperature
            log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
            total = total - log_prob[:, mean_classes == c].mean(dim=1).sum()
            anchors += pixels.shape[0]
    return total / max(anchors, 1)


# --- the fastest vectorised eager forms of the same values ----------------------------------------
# Plain PyTorch as one would write each loss for speed: no Python loops over images or classes, every
# product batched, O(N·D) work wherever the dense form would build an O(N²) mask. They are the peers of
# the seed-size table (test_seed_sizes.py) and, like the forms above, checked equal in value and
# gradient to the contrastkit modules (test_agreement.py).


def _unit(x: torch.Tensor, dim: int, scale: float = 1.0) -> torch.Tensor:
    """x / max(‖x‖, 1e-12) · scale along ``dim`` (``F.normalize``'s value, in fewer and cheaper ops)."""
    inverse = x.square().sum(dim=dim, keepdim=True).clamp_min(1e-24).rsqrt()
    return x * (inverse * scale if scale != 1.0 else inverse)


def _compute(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cross_level_eager(global_map: torch.Tensor, local_map: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """``CrossLevelContrast()`` (negatives within the image, local side detached) on (B, C, gh, gw) maps:
    per image one batched product of its L2-normalised cells (scaled by 1/τ) against its detached,
    normalised patches, then each row's log-sum-exp minus its diagonal (the positive) — the value of
    PatchNCE's cross-entropy with target 0 without building the concatenated logits or the targets.
    """
    q = _unit(_compute(global_map).flatten(2), 1, 1.0 / temperature)  # (B, C, cells)
    k = _unit(_compute(local_map.detach()).flatten(2), 1)
    s = torch.bmm(q.transpose(1, 2), k)  # (B, cells, cells)
    return (s.logsumexp(dim=2) - s.diagonal(dim1=1, dim2=2)).mean()


def prototype_eager(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    pair_index: torch.Tensor | None = None, temperature: float = 0.1) -> torch.Tensor:
    """``PseudoLabelContrast(mode="prototype", num_classes=K)`` (background 0 excluded, every foreground
    pixel an anchor), vectorised over images and classes.

    The class means come from one batched product of the (B, D, HW) embeddings with the (B, HW, K-1)
    foreground one-hot; the logits are one batched product of the normalised pixels with the normalised
    means, (B, HW, K-1), classes absent from the image masked out. Each anchor's loss is its row's
    log-sum-exp minus its own class's logit. With ``pair_index`` the pair's means are K-1 more columns
    (absent, or the image itself: masked) and a second positive when the pair holds the anchor's class.
    """
    b, d = embeddings.shape[:2]
    x = _compute(embeddings).reshape(b, d, -1)  # (B, D, HW)
    y = labels.reshape(b, -1)
    foreground = y > 0
    classes = torch.arange(1, num_classes, device=y.device)
    onehot = (y[:, :, None] == classes).to(x.dtype)  # (B, HW, K-1): background and ignored pixels all 0
    counts = onehot.sum(dim=1)  # (B, K-1)
    means = torch.bmm(x, onehot) / counts.clamp_min(1)[:, None, :]  # (B, D, K-1)
    present = counts > 0
    own = (y - 1).clamp_min(0)[:, :, None]  # column of each pixel's class (background: any, masked below)
    if pair_index is not None:
        paired = present[pair_index] & (pair_index != torch.arange(b, device=y.device))[:, None]
        means = torch.cat([means, means[pair_index]], dim=2)
        present = torch.cat([present, paired], dim=1)
    q = _unit(x, 1, 1.0 / temperature)
    s = torch.bmm(q.transpose(1, 2), _unit(means, 1))  # (B, HW, K-1) or (B, HW, 2(K-1))
    s = s.masked_fill(~present[:, None, :], torch.finfo(s.dtype).min)  # finite: no NaN in an empty image
    positive = s.gather(2, own).squeeze(2)
    if pair_index is not None:
        in_pair = paired.gather(1, own.squeeze(2))
        second = s.gather(2, own + (num_classes - 1)).squeeze(2)
        positive = (positive + torch.where(in_pair, second, 0.0)) / (1.0 + in_pair.to(s.dtype))
    loss = torch.where(foreground, s.logsumexp(dim=2) - positive, 0.0)
    return loss.sum() / foreground.sum().clamp_min(1)


def supcon_masked(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Self-contrast SupCon (``info_nce(z, labels=y)``) as it is usually written: normalise, one N×N
    product, the diagonal masked out, a log-sum-exp per row, the mean of the positives' logits through an
    N×N label mask, the mean over the rows that have a positive."""
    z = F.normalize(_compute(features), dim=1)
    s = z @ z.T / temperature
    eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    s = s.masked_fill(eye, float("-inf"))
    positive = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = positive.sum(dim=1)
    loss = s.logsumexp(dim=1) - torch.where(positive, s, 0.0).sum(dim=1) / n_pos.clamp_min(1)
    valid = n_pos > 0
    return torch.where(valid, loss, 0.0).sum() / valid.sum().clamp_min(1)


def supcon_eager(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1,
                 num_classes: int | None = None) -> torch.Tensor:
    """Self-contrast SupCon (``info_nce(z, labels=y)``), the fastest eager form: one N×N product whose
    diagonal is set to -inf in place, a log-sum-exp per row, and no N×N mask at all — the sum of a row's
    positive logits is its query against its class's sum of keys minus itself (O(N·D)), the positive
    count its class count minus one. Labels are class ids in [0, ``num_classes``) (read from the labels
    when not given: one host synchronisation)."""
    z = _unit(_compute(features), 1)
    q = z / temperature
    s = q @ z.T
    s.diagonal().fill_(float("-inf"))  # the product's output is not saved for its backward
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    onehot = (labels[:, None] == torch.arange(num_classes, device=labels.device)).to(z.dtype)  # (N, C)
    class_sums = onehot.T @ z  # (C, D)
    n_pos = onehot.sum(dim=0)[labels] - 1
    positive_sum = (q * (class_sums[labels] - z)).sum(dim=1)
    loss = s.logsumexp(dim=1) - positive_sum / n_pos.clamp_min(1)
    valid = n_pos > 0
    return torch.where(valid, loss, 0.0).sum() / valid.sum().clamp_min(1)


def sample_per_class(labels: torch.Tensor, per_class: int, num_classes: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, H, W) mask of ``min(per_class, count)`` foreground pixels drawn uniformly without replacement
    per (image, class), without a host synchronisation: each pixel gets its class plus a uniform key in
    [0, 1), a per-image sort puts each class's pixels in random order, and a pixel is drawn when its
    rank within its class is below ``per_class``. (The same distribution as contrastkit's sampler, not the
    same draws.)"""
    b = labels.shape[0]
    y = labels.reshape(b, -1)
    foreground = y > 0
    noise = torch.rand(y.shape, generator=generator, device=y.device if generator is None else generator.device)
    key = torch.where(foreground, y.to(torch.float64) + noise.to(device=y.device, dtype=torch.float64), float("inf"))
    order = key.argsort(dim=1)
    ranked = y.gather(1, order).clamp_min(0)  # each image's pixels by (class, random key)
    counts = ((y[:, :, None] == torch.arange(num_classes, device=y.device)) & foreground[:, :, None]).sum(dim=1)
    first = counts.cumsum(dim=1) - counts  # where each class starts in the sorted order (background: after all)
    rank = torch.arange(y.shape[1], device=y.device) - first.gather(1, ranked)
    drawn = foreground.gather(1, order) & (rank < per_class)
    return torch.zeros_like(foreground).scatter(1, order, drawn).reshape(labels.shape)


def pixel_supcon(embeddings: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor, num_classes: int,
                 temperature: float = 0.1) -> torch.Tensor:
    """``PseudoLabelContrast(mode="pixel")`` on a given (B, H, W) anchor mask: the anchors' rows gathered
    (one boolean index), then :func:`supcon_eager` over them."""
    rows = embeddings.permute(0, 2, 3, 1)[anchors]
    return supcon_eager(rows, labels[anchors], temperature, num_classes)


def pixel_eager(embeddings: torch.Tensor, labels: torch.Tensor, per_class: int, num_classes: int,
                generator: torch.Generator | None = None, temperature: float = 0.1) -> torch.Tensor:
    """``PseudoLabelContrast(mode="pixel", anchors_per_class=per_class, num_classes=K)``: draw the anchors
    (:func:`sample_per_class`), then the SupCon over them (:func:`pixel_supcon`)."""
    anchors = sample_per_class(labels, per_class, num_classes, generator)
    return pixel_supcon(embeddings, labels, anchors, num_classes, temperature)
