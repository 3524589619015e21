"""PairedAugment moves image and mask together and keeps masks binary."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("kornia")

from contrastkit.data import PairedAugment  # noqa: E402


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/quarter turns of a (C, H, W) tensor."""
    turns = [torch.rot90(x, k, (1, 2)) for k in range(4)]
    return turns + [t.flip(-1) for t in turns]


def random_masks(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 1, h, w, generator=g) > 0.6).float()


def test_flips_and_quarter_turns_are_exact_and_shared():
    torch.manual_seed(0)
    mask = random_masks(32, 9, 9)
    texture = torch.rand(32, 2, 9, 9, generator=torch.Generator().manual_seed(1))
    image = torch.cat([mask, texture], 1)  # channel 0 encodes the mask
    out_image, out_mask = PairedAugment(p_flip=0.5, p_rot90=1.0)(image, mask)
    assert out_mask.shape == mask.shape and set(out_mask.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(out_image[:, :1], out_mask, atol=1e-4, rtol=0)
    used = set()
    for i in range(32):
        matches = [k for k, t in enumerate(dihedral(image[i])) if torch.allclose(t, out_image[i], atol=1e-4)]
        assert matches, f"sample {i} is not a flip/quarter turn of its input"
        used.add(matches[0])
    assert len(used) >= 4  # parameters are drawn per sample


def test_affine_keeps_mask_binary_and_aligned():
    torch.manual_seed(0)
    mask = torch.zeros(16, 1, 32, 32)
    mask[:, :, 8:24, 10:22] = 1
    image = torch.cat([mask, mask, mask], 1)
    aug = PairedAugment(p_flip=0.5, p_rot90=0.5, degrees=20, translate=0.1, scale=(0.9, 1.1), p_affine=1.0)
    out_image, out_mask = aug(image, mask)
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(out_mask, mask)
    # Bilinear image and nearest mask agree except on a thin boundary band.
    disagreement = ((out_image[:, :1] > 0.5).float() != out_mask).float().mean()
    assert disagreement < 0.03


def test_jitter_changes_only_the_image():
    torch.manual_seed(0)
    mask = random_masks(8, 16, 16)
    image = torch.rand(8, 3, 16, 16)
    aug = PairedAugment(
        p_flip=0.0, p_rot90=0.0, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p_jitter=1
    )
    out_image, out_mask = aug(image, mask)
    assert torch.equal(out_mask, mask)
    assert not torch.allclose(out_image, image)
    assert out_image.min() >= 0 and out_image.max() <= 1


def test_long_mask_and_image_only():
    torch.manual_seed(0)
    mask = random_masks(4, 8, 8).long()
    image = torch.rand(4, 1, 8, 8)
    out_image, out_mask = PairedAugment()(image, mask)
    assert out_mask.dtype == torch.long and out_image.shape == image.shape
    assert PairedAugment()(image).shape == image.shape


def test_errors():
    with pytest.raises(ValueError, match="p_flip"):
        PairedAugment(p_flip=2)
    with pytest.raises(ValueError, match="degrees"):
        PairedAugment(degrees=-1)
    with pytest.raises(ValueError, match="scale"):
        PairedAugment(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="square"):
        PairedAugment()(torch.rand(2, 3, 8, 10), torch.zeros(2, 1, 8, 10))
    with pytest.raises(ValueError, match="must match"):
        PairedAugment()(torch.rand(2, 3, 8, 8), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="image"):
        PairedAugment()(torch.zeros(3, 8, 8))
    # non-square images are fine without quarter turns
    assert PairedAugment(p_rot90=0)(torch.rand(2, 3, 8, 10)).shape == (2, 3, 8, 10)
