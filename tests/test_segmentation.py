"""Supervised segmentation losses against float64 formulas written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from contrastkit.segmentation import bce_dice_loss, dice_ce_loss


def dice_by_hand(p, t, smooth=1.0):
    # p, t: (B, K, H, W) in float64; Dice per class over batch and space, averaged over classes.
    per_class = []
    for c in range(p.shape[1]):
        inter = float((p[:, c] * t[:, c]).sum())
        per_class.append((2 * inter + smooth) / (float(p[:, c].sum() + t[:, c].sum()) + smooth))
    return 1 - sum(per_class) / len(per_class)


def test_bce_dice_matches_formula_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 1, 5, 6, generator=g) > 0.6).double()
    p = torch.sigmoid(logits.detach())
    bce = -(mask * p.log() + (1 - mask) * (1 - p).log()).mean()
    want = float(bce) + dice_by_hand(p, mask)
    assert bce_dice_loss(logits, mask).item() == pytest.approx(want, rel=1e-10)
    assert torch.autograd.gradcheck(lambda x: bce_dice_loss(x, mask), (logits,))


def test_dice_ce_matches_formula_with_ignored_pixels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 5, 5), generator=g)
    labels[0, 0] = -1
    valid = labels != -1
    p = logits.detach().softmax(1) * valid[:, None]
    t = F.one_hot(labels.clamp_min(0), 4).movedim(-1, 1).double() * valid[:, None]
    logp = logits.detach().log_softmax(1)
    ce = -logp.gather(1, labels.clamp_min(0)[:, None])[:, 0][valid].mean()
    want = float(ce) + dice_by_hand(p, t)
    assert dice_ce_loss(logits, labels).item() == pytest.approx(want, rel=1e-10)
    assert torch.autograd.gradcheck(lambda x: dice_ce_loss(x, labels), (logits,))


def test_all_ignored_gives_zero_attached():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = dice_ce_loss(logits, torch.full((1, 4, 4), -1))
    assert loss.item() == 0.0 and loss.requires_grad


def test_bad_input():
    with pytest.raises(ValueError, match="one channel"):
        bce_dice_loss(torch.randn(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        bce_dice_loss(torch.randn(1, 1, 4, 4), torch.zeros(1, 1, 4, 3))
    with pytest.raises(TypeError, match="integer"):
        dice_ce_loss(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        dice_ce_loss(torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 3))
