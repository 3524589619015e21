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
