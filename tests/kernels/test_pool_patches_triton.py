"""The fused patch pooling kernel against F.avg_pool2d / F.normalize in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pool_patches(*args, **kwargs):
    from contrastkit.kernels import pool_patches as kernel

    return kernel(*args, **kwargs)


def reference(x, grid_h, grid_w, normalize):
    pooled = F.avg_pool2d(x, (x.shape[2] // grid_h, x.shape[3] // grid_w))
    return F.normalize(pooled, dim=1) if normalize else pooled


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def check(x, grid_h, grid_w, normalize):
    dtype = x.dtype
    leaf = x.detach().to(DEVICE).requires_grad_(True)
    out = pool_patches(leaf, grid_h, grid_w, normalize)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    (grad,) = torch.autograd.grad((out.float() * upstream).sum(), leaf)

    ref_leaf = x.detach().double().requires_grad_(True)
    want = reference(ref_leaf, grid_h, grid_w, normalize)
    (ref_grad,) = torch.autograd.grad((want * upstream.double().cpu()).sum(), ref_leaf)

    assert out.shape == want.shape and out.dtype == dtype and grad.dtype == dtype
    for got, exp in ((out, want.detach()), (grad, ref_grad)):
        assert torch.isfinite(got).all()
        err = (got.double().cpu() - exp).abs().max().item()
        assert err <= TOL[dtype] * (1 + exp.abs().max().item()), err


@pytest.mark.parametrize(
    "shape,grid,dtype,normalize",
    [
        ((2, 3, 8, 12), (2, 3), torch.float32, False),
        ((2, 24, 8, 12), (4, 4), torch.float32, True),
        ((1, 130, 6, 6), (1, 1), torch.bfloat16, True),
        ((3, 24, 5, 7), (5, 7), torch.float16, True),
        ((2, 5, 9, 4), (3, 2), torch.bfloat16, False),
        ((1, 1, 4, 4), (2, 2), torch.float32, True),
    ],
)
def test_matches_float64(shape, grid, dtype, normalize):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    check(x, *grid, normalize)


@pytest.mark.parametrize("normalize", [False, True])
def test_strided_inputs(normalize):
    base = torch.randn(2, 24, 8, 14, generator=torch.Generator().manual_seed(3))
    check(base.contiguous(memory_format=torch.channels_last), 4, 2, normalize)
    check(base[:, ::2, :, 1:13], 2, 3, normalize)  # a sliced view, never copied


def test_zero_cells_stay_finite():
    x = torch.randn(1, 6, 4, 4)
    x[..., :2, :2] = 0.0  # the top-left cell pools to the zero vector
    check(x, 2, 2, True)


def test_bad_input():
    x = torch.randn(1, 3, 6, 6, device=DEVICE)
    with pytest.raises(ValueError, match="grid_h=4 must divide"):
        pool_patches(x, 4, 3, False)
    with pytest.raises(ValueError, match="grid_w must be a positive int"):
        pool_patches(x, 2, 0, False)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        pool_patches(x[0], 2, 2, False)
    with pytest.raises(TypeError, match="float64"):
        pool_patches(x.double(), 2, 2, False)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        pool_patches(x, 2, 2, 1)
