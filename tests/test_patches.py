"""patchify / unpatchify / pool_patches / as_grid."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contrastkit import patchify, pool_patches, unpatchify
from contrastkit.patches import as_grid


@pytest.mark.parametrize("grid", [1, 5, (3, 4), [2, 1]])
@pytest.mark.parametrize("batch", [1, 3])
def test_round_trip(grid, batch):
    gh, gw = as_grid(grid)
    x = torch.randn(batch, 2, gh * 3, gw * 2)
    patches = patchify(x, grid)
    assert patches.shape == (batch * gh * gw, 2, 3, 2)
    assert torch.equal(unpatchify(patches, grid), x)
    assert torch.equal(patchify(unpatchify(patches, grid), grid), patches)


def test_patch_order_is_image_then_row_major():
    b, c, gh, gw, ph, pw = 2, 3, 3, 4, 2, 5
    x = torch.randn(b, c, gh * ph, gw * pw)
    patches = patchify(x, (gh, gw))
    for i in range(b):
        for r in range(gh):
            for s in range(gw):
                expected = x[i, :, r * ph:(r + 1) * ph, s * pw:(s + 1) * pw]
                assert torch.equal(patches[i * gh * gw + r * gw + s], expected)


def test_patchify_keeps_integer_masks():
    mask = torch.randint(0, 3, (2, 1, 6, 6))
    assert torch.equal(unpatchify(patchify(mask, 3), 3), mask)


@pytest.mark.parametrize("grid,size", [(5, (20, 20)), ((3, 4), (9, 8)), (1, (7, 5)), ((2, 3), (2, 3))])
def test_pool_matches_adaptive_avg_pool(grid, size):
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    expected = F.adaptive_avg_pool2d(x, as_grid(grid))
    torch.testing.assert_close(pool_patches(x, grid), expected, rtol=1e-12, atol=1e-12)


def test_pool_equals_mean_of_each_patch():
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    pooled = pool_patches(x, (2, 4))
    per_patch = patchify(x, (2, 4)).mean(dim=(2, 3))
    torch.testing.assert_close(pooled.permute(0, 2, 3, 1).reshape(-1, 3), per_patch)


def test_pool_normalize():
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    pooled = pool_patches(x, 3, normalize=True)
    torch.testing.assert_close(pooled.norm(dim=1), torch.ones(2, 3, 3, dtype=torch.float64))
    raw = F.adaptive_avg_pool2d(x, 3)
    torch.testing.assert_close(pooled, raw / raw.norm(dim=1, keepdim=True))


def test_pool_gradient():
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pool_patches(t, (2, 3), normalize=True), (x,))


def test_pool_half_precision_stays_finite():
    x = torch.randn(2, 3, 8, 8).to(torch.bfloat16)
    out = pool_patches(x, 4, normalize=True)
    assert out.shape == (2, 3, 4, 4) and torch.isfinite(out.float()).all()


def test_as_grid():
    assert as_grid(5) == (5, 5)
    assert as_grid((3, 4)) == (3, 4)
    assert as_grid([1, 2]) == (1, 2)
    assert as_grid(np.int64(3)) == (3, 3)
    assert as_grid((np.int32(2), 3)) == (2, 3)
    with pytest.raises(TypeError, match="grid"):
        as_grid(True)
    with pytest.raises(TypeError, match="grid"):
        as_grid(2.0)
    with pytest.raises(TypeError, match="grid"):
        as_grid((1, 2, 3))
    with pytest.raises(TypeError, match="grid"):
        as_grid((2, True))
    with pytest.raises(ValueError, match="grid must be positive"):
        as_grid(0)
    with pytest.raises(ValueError, match="grid must be positive"):
        as_grid((2, -1))


def test_bad_input():
    x = torch.randn(1, 2, 10, 9)
    with pytest.raises(ValueError, match=r"grid \(3, 3\) must divide .* \(10, 9\)"):
        patchify(x, 3)
    with pytest.raises(ValueError, match="must divide"):
        pool_patches(x, (5, 2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        patchify(torch.randn(2, 4, 4), 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        patchify(np.zeros((1, 1, 4, 4)), 2)
    with pytest.raises(ValueError, match="empty"):
        patchify(torch.randn(1, 1, 0, 4), 2)
    with pytest.raises(TypeError, match="floating"):
        pool_patches(torch.ones(1, 1, 4, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="not a multiple"):
        unpatchify(torch.randn(5, 1, 2, 2), 2)
    with pytest.raises(ValueError, match=r"\(B\*gh\*gw, C, ph, pw\)"):
        unpatchify(torch.randn(4, 2, 2), 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        unpatchify([1, 2], 2)


def test_pool_backends_agree_and_are_chosen_in_one_place(monkeypatch):
    import contrastkit.core as core

    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    want = pool_patches(x, (2, 3), normalize=True, backend="reference")
    torch.testing.assert_close(pool_patches(x, (2, 3), normalize=True, backend="torch"), want)
    chosen = []
    original = core.resolve_backend
    monkeypatch.setattr("contrastkit.patches.resolve_backend",
                        lambda *a: chosen.append(a[0]) or original(*a))
    pool_patches(x, 2)
    assert chosen == ["auto"]  # the same resolver as info_nce: CPU float64 -> torch
    with pytest.raises(ValueError, match="backend"):
        pool_patches(x, 2, backend="gpu")
    with pytest.raises(TypeError, match="normalize"):
        pool_patches(x, 2, normalize=1)
