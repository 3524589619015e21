"""Property-based tests: ``info_nce`` and every loss module on random valid inputs, float32 against
the float64 specification — row norms from 1e-30 to 1e30, τ across its whole allowed range, weights
up to 1e38 — finite and equal within float32's precision, or a clear error; never NaN, never
silently different.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import contrastkit as ck
from contrastkit._validation import MAX_TEMPERATURE, MIN_TEMPERATURE

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BACKENDS = ["reference", "dense", "torch"]


def rows_of_any_norm(generator, count, dim, low=-30.0, high=30.0):
    """Random directions with norms 10^U(low, high), float32 (where the range is representable)."""
    x = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    exponent = torch.empty(count, 1, dtype=torch.float64).uniform_(low, high, generator=generator)
    return (x / x.norm(dim=1, keepdim=True).clamp_min(1e-300) * 10.0 ** exponent).float()


def temperatures():
    return st.floats(math.log10(MIN_TEMPERATURE), math.log10(MAX_TEMPERATURE)).map(lambda e: 10.0 ** e)


def assert_close_scaled(got, want, scale, what):
    assert torch.isfinite(got).all(), f"{what}: not finite: {got}"
    err = (got.double() - want.double()).abs()
    bound = 1e-4 * scale + 1e-4 * want.double().abs()
    assert (err <= bound).all(), f"{what}: error {err.max():.3g} above {bound.min():.3g}"


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(["self", "qk", "paired"]), n=st.integers(1, 7),
       m=st.integers(1, 7), dim=st.integers(1, 5), classes=st.integers(1, 3), with_groups=st.booleans(),
       weight_exponent=st.one_of(st.none(), st.floats(-3, 38)), tau=temperatures(),
       denominator=st.sampled_from(["all", "negatives", "each_positive"]),
       reduction=st.sampled_from(["mean", "sum", "none"]), backend=st.sampled_from(BACKENDS))
def test_info_nce_float32_matches_float64_at_any_norm_and_temperature(seed, mode, n, m, dim, classes, with_groups,
                                                                      weight_exponent, tau, denominator, reduction,
                                                                      backend):
    g = torch.Generator().manual_seed(seed)
    query = rows_of_any_norm(g, n, dim)
    kwargs = {}
    if mode == "self":
        key = None
        kwargs["labels"] = torch.randint(-1, classes, (n,), generator=g)
        if with_groups:
            kwargs["groups"] = torch.randint(0, 2, (n,), generator=g)
    elif mode == "paired":
        key = rows_of_any_norm(g, n, dim)
        if with_groups:
            kwargs["groups"] = torch.randint(0, 2, (n,), generator=g)
    else:
        key = rows_of_any_norm(g, m, dim)
        kwargs["labels"] = torch.randint(-1, classes, (n,), generator=g)
        kwargs["key_labels"] = torch.randint(0, classes, (m,), generator=g)
        if with_groups:
            kwargs["groups"] = torch.randint(0, 2, (n,), generator=g)
            kwargs["key_groups"] = torch.randint(0, 2, (m,), generator=g)
    weight_scale = 1.0
    if weight_exponent is not None:
        if reduction != "mean":  # a weighted sum of 1e38s has no float32 value: weights that keep one
            weight_exponent = min(weight_exponent, 3.0)
        weight_scale = 10.0 ** weight_exponent
        kwargs["weights"] = (torch.rand(n, generator=g, dtype=torch.float64) * weight_scale).float()
    options = dict(temperature=tau, denominator=denominator, reduction=reduction, **kwargs)

    leaves = [query.clone().requires_grad_(True)] + ([] if key is None else [key.clone().requires_grad_(True)])
    got = ck.info_nce(leaves[0], None if key is None else leaves[1], backend=backend, **options)
    want_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
    options64 = dict(options, weights=kwargs["weights"].double()) if "weights" in kwargs else options
    want = ck.info_nce(want_leaves[0], None if key is None else want_leaves[1], backend="reference", **options64)

    # float32 logits of size 1/τ carry an absolute error of ~1e-7/τ; sums add up to N of them.
    rows = n if reduction == "sum" else 1
    scale = (1.0 + 1.0 / tau) * rows * (weight_scale if reduction != "mean" else 1.0)
    assert_close_scaled(got.detach(), want.detach(), scale, "loss")

    upstream = torch.rand(got.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got * upstream.float()).sum(), leaves, allow_unused=True)
    want_grads = torch.autograd.grad((want * upstream).sum(), want_leaves, allow_unused=True)
    for x, grad, want_grad in zip(leaves, grads, want_grads, strict=True):
        if want_grad is None:
            continue
        grad = torch.zeros_like(x) if grad is None else grad
        # A row's gradient is its upstream over its norm (floored at 1e-12), times ~1/τ.
        inverse = (x.detach().double().square().sum(1, keepdim=True) + 1e-24).rsqrt()
        assert_close_scaled(grad, want_grad, scale * (n + 1) * inverse, "gradient")


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), backend=st.sampled_from(BACKENDS), exponent=st.floats(19, 30))
def test_rows_too_large_for_a_float32_sum_of_squares_normalise_exactly(seed, backend, exponent):
    # Rows of norm 1e19..1e30: |x|² overflows float32. Scaled before normalising, the loss and the
    # gradient (times the scale) are those of the same directions at norm 1.
    g = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    big = (unit * 10.0 ** exponent).requires_grad_(True)
    small = unit.clone().requires_grad_(True)
    loss_big = ck.info_nce(big, labels=labels, backend=backend)
    loss_small = ck.info_nce(small, labels=labels, backend=backend)
    loss_big.backward()
    loss_small.backward()
    torch.testing.assert_close(loss_big, loss_small, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(big.grad * 10.0 ** exponent, small.grad, rtol=1e-4, atol=1e-5)


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(20, 30))
def test_unnormalised_logits_beyond_float32_are_a_clear_error(seed, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, generator=g) * 10.0 ** scale
    with pytest.raises(ValueError, match="normalize=False the logits"):
        ck.info_nce(x, labels=torch.tensor([0, 0, 1, 1, 2, 2]), normalize=False)


def maps(g, b, c, h, w, low=-30.0, high=30.0):
    """(B, C, H, W) maps whose pixel vectors have norms 10^U(low, high)."""
    rows = rows_of_any_norm(g, b * h * w, c, low, high)
    return rows.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def module_cases(g, tau):
    """(name, float32 call, float64 call) for every loss module on fresh random inputs."""
    b, c = 2, 4
    cells_q, cells_k = maps(g, b, c, 2, 2), maps(g, b, c, 2, 2)
    pixels = maps(g, b, c, 4, 4)
    pixel_labels = torch.randint(-1, 3, (b, 4, 4), generator=g)
    z1, z2 = rows_of_any_norm(g, 4, c), rows_of_any_norm(g, 4, c)
    features = rows_of_any_norm(g, 8, c).reshape(4, 2, c)
    labels = torch.tensor([0, 1, 0, 1])
    slices = rows_of_any_norm(g, 8, c)
    volume, partition = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    view = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    patch_logits = torch.randn(b * 4, 1, 4, 4, generator=g) * 10
    full_logits = torch.randn(b, 1, 8, 8, generator=g) * 10
    return [
        ("CrossLevelContrast", ck.CrossLevelContrast(temperature=tau), (cells_q, cells_k)),
        ("CrossLevelContrast batch", ck.CrossLevelContrast(temperature=tau, negatives="batch", symmetric=True,
                                                          detach_local=False), (cells_q, cells_k)),
        ("CrossLevelConsistency", ck.CrossLevelConsistency(), (patch_logits, full_logits)),
        ("NTXentLoss", ck.NTXentLoss(temperature=tau), (z1, z2)),
        ("SupConLoss", ck.SupConLoss(temperature=tau), (features, labels)),
        ("PatchNCELoss", ck.PatchNCELoss(temperature=tau, num_patches=None), (pixels, maps(g, b, c, 4, 4))),
        ("LocalContrast", ck.LocalContrast(temperature=tau, region_grid=2), (pixels, maps(g, b, c, 4, 4))),
        ("GlobalContrast", ck.GlobalContrast(temperature=tau), (slices, volume, partition, view)),
        ("PseudoLabelContrast prototype", ck.PseudoLabelContrast(temperature=tau, mode="prototype"),
         (pixels, pixel_labels)),
        ("PseudoLabelContrast pixel", ck.PseudoLabelContrast(temperature=tau, mode="pixel"),
         (pixels, pixel_labels)),
    ]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), tau=temperatures())
def test_every_loss_module_float32_matches_float64_at_any_norm_and_temperature(seed, tau):
    for name, module, inputs in module_cases(torch.Generator().manual_seed(seed), tau):
        leaves = [x.clone().requires_grad_(True) if x.is_floating_point() else x for x in inputs]
        wide = [x.detach().double().requires_grad_(True) if x.is_floating_point() else x for x in inputs]
        torch.manual_seed(seed)  # pixel mode draws its anchors from the global generator
        got = module(*leaves)
        torch.manual_seed(seed)
        want = module(*wide)
        scale = (1.0 + 1.0 / tau) * (10.0 if "Consistency" in name else 1.0)
        assert_close_scaled(got.detach(), want.detach(), scale, name)
        got.backward()
        want.backward()
        for x, y in zip(leaves, wide, strict=True):
            if isinstance(x, torch.Tensor) and x.grad is not None:
                assert torch.isfinite(x.grad).all(), f"{name}: gradient not finite"
                flat = x.detach().double().movedim(1, -1) if x.dim() == 4 else x.detach().double()
                inverse = (flat.square().sum(-1, keepdim=True) + 1e-24).rsqrt()
                inverse = inverse.movedim(-1, 1) if x.dim() == 4 else inverse
                assert_close_scaled(x.grad, y.grad, scale * 20 * inverse, f"{name} gradient")
