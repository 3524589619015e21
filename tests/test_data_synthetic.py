"""SyntheticPolyps: seeded, per-sample independent, binary masks, sensible lesion sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastkit.data import SyntheticPolyps


def test_shapes_ranges_and_binary_masks():
    ds = SyntheticPolyps(40, size=64, seed=0)
    assert len(ds) == 40
    fractions = []
    for i in range(len(ds)):
        image, mask = ds[i]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert mask.shape == (1, 64, 64) and mask.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        fractions.append(mask.mean().item())
    fractions = np.array(fractions)
    assert fractions.min() > 0.002 and fractions.max() < 0.5  # every image has a lesion, none fills it
    assert 0.02 < fractions.mean() < 0.15
    assert (fractions < 0.02).any()  # small lesions occur


def test_deterministic_and_independent_of_other_samples():
    a, b = SyntheticPolyps(20, size=48, seed=3), SyntheticPolyps(5, size=48, seed=3)
    for i in (4, 2):  # out of order, and in a data set of another length
        torch.testing.assert_close(a[i], b[i], rtol=0, atol=0)
    assert not torch.equal(a[0][0], SyntheticPolyps(20, size=48, seed=4)[0][0])
    assert not torch.equal(a[0][0], a[1][0])


def test_lesion_is_low_contrast():
    # The lesion shifts the mean colour, but by less than the background's own spread.
    ds = SyntheticPolyps(20, size=96, seed=1)
    ratios = []
    for i in range(len(ds)):
        image, mask = ds.generate(i)
        inside, outside = image[:, mask], image[:, ~mask]
        shift = np.abs(inside.mean(1) - outside.mean(1)).max()
        ratios.append(shift / outside.std(1).max())
    assert np.median(ratios) < 1.5
    assert np.median(ratios) > 0.1  # but there is a signal


def test_transform_and_errors():
    flip = SyntheticPolyps(3, size=32, seed=0, transform=lambda x, m: (x.flip(-1), m.flip(-1)))
    plain = SyntheticPolyps(3, size=32, seed=0)
    torch.testing.assert_close(flip[1][1], plain[1][1].flip(-1))
    with pytest.raises(IndexError):
        plain[3]
    with pytest.raises(ValueError, match="size"):
        SyntheticPolyps(3, size=4)
    with pytest.raises(ValueError, match="n must"):
        SyntheticPolyps(0)
