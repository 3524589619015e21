"""CrossLevelContrast / CrossLevelConsistency against float64 re-implementations of the original."""

import itertools

import pytest
import torch

from contrastkit import (
    CrossLevelConsistency,
    CrossLevelContrast,
    cross_level_consistency,
    cross_level_contrast,
    info_nce,
)

GRIDS = [(5, 5), (3, 4), (1, 1)]


# ---------------------------------------------------------------- independent re-implementations
def original_patchnce(global_map, local_map, tau, negatives):
    """Cell-by-cell PatchNCE: cross-entropy with target 0 over [q_i.k_i, q_i.k_j (j != i)] / tau."""
    b, c, gh, gw = global_map.shape
    q = global_map.double().reshape(b, c, gh * gw).transpose(1, 2)
    k = local_map.double().reshape(b, c, gh * gw).transpose(1, 2)
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    losses = []
    for img, cell in itertools.product(range(b), range(gh * gw)):
        query = q[img, cell]
        if negatives == "image":
            others = [k[img, j] for j in range(gh * gw) if j != cell]
        else:
            cells = itertools.product(range(b), range(gh * gw))
            others = [k[i, j] for i, j in cells if (i, j) != (img, cell)]
        logits = torch.stack([query @ k[img, cell]] + [query @ key for key in others]) / tau
        losses.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(losses).mean()


def original_consistency_sum(patch_logits, full_logits, gh, gw, activation="sigmoid"):
    """The original's reduction: mean over (B, K, ph, pw) for each cell, summed over the cells."""
    b, k, h, w = full_logits.shape
    ph, pw = h // gh, w // gw
    patches = patch_logits.double().reshape(b, gh, gw, k, ph, pw)
    full = full_logits.double().reshape(b, k, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
    act = torch.sigmoid if activation == "sigmoid" else (lambda z: torch.softmax(z, dim=3))
    return ((act(patches) - act(full)) ** 2).mean(dim=(0, 3, 4, 5)).sum()


def consistency_by_loops(patch_logits, full_logits, gh, gw):
    b, k, h, w = full_logits.shape
    ph, pw = h // gh, w // gw
    total, count = 0.0, 0
    for img, r, s in itertools.product(range(b), range(gh), range(gw)):
        region = full_logits[img, :, r * ph:(r + 1) * ph, s * pw:(s + 1) * pw].double()
        patch = patch_logits[img * gh * gw + r * gw + s].double()
        total = total + ((torch.sigmoid(patch) - torch.sigmoid(region)) ** 2).sum()
        count += region.numel()
    return total / count


def maps(b, c, gh, gw, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(b, c, gh, gw, generator=g, dtype=torch.float64,  # noqa: E731
                               requires_grad=requires_grad)
    return make(), make()


# ---------------------------------------------------------------- contrast: values
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_contrast_matches_original(grid, b, negatives):
    q, k = maps(b, 6, *grid)
    expected = original_patchnce(q, k, 0.07, negatives)
    got = CrossLevelContrast(negatives=negatives)(q, k)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_contrast_symmetric_matches_original(grid, negatives):
    q, k = maps(4, 5, *grid, seed=1)
    expected = 0.5 * (original_patchnce(q, k, 0.2, negatives) + original_patchnce(k, q, 0.2, negatives))
    got = cross_level_contrast(q, k, temperature=0.2, negatives=negatives, symmetric=True)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_contrast_local_layouts_agree():
    q, k = maps(2, 4, 3, 4)
    rows = k.permute(0, 2, 3, 1).reshape(-1, 4)
    as_map = cross_level_contrast(q, k)
    torch.testing.assert_close(cross_level_contrast(q, rows), as_map, rtol=0, atol=0)
    torch.testing.assert_close(cross_level_contrast(q, rows[:, :, None, None]), as_map, rtol=0, atol=0)


def test_contrast_is_info_nce_with_image_groups():
    q, k = maps(3, 4, 2, 3)
    rows = lambda x: x.permute(0, 2, 3, 1).reshape(-1, 4)  # noqa: E731
    groups = torch.arange(3).repeat_interleave(6)
    expected = info_nce(rows(q), rows(k), groups=groups, temperature=0.07, backend="reference")
    torch.testing.assert_close(cross_level_contrast(q, k), expected, rtol=1e-12, atol=1e-12)


def test_contrast_without_normalize_uses_raw_dot_products():
    q, k = maps(2, 3, 2, 2)
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    # Raw rows that are already unit length give the normalised value.
    torch.testing.assert_close(cross_level_contrast(qn, kn, normalize=False), cross_level_contrast(q, k))
    assert not torch.allclose(cross_level_contrast(q, k, normalize=False), cross_level_contrast(q, k))


def test_one_by_one_grid_with_image_negatives_is_exactly_zero():
    q, k = maps(4, 3, 1, 1, requires_grad=True)
    loss = CrossLevelContrast()(q, k)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_half_precision_is_finite_float32():
    q, k = maps(2, 8, 5, 5)
    loss = cross_level_contrast(q.to(torch.bfloat16), k.to(torch.bfloat16))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), original_patchnce(q, k, 0.07, "image"), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------- contrast: gradients
@pytest.mark.parametrize("negatives", ["image", "batch"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_contrast_gradients_match_original(negatives, symmetric):
    q, k = maps(2, 4, 3, 4, requires_grad=True)
    got = cross_level_contrast(q, k, negatives=negatives, symmetric=symmetric, detach_local=False)
    gq, gk = torch.autograd.grad(got, (q, k))
    ref = original_patchnce(q, k, 0.07, negatives)
    if symmetric:
        ref = 0.5 * (ref + original_patchnce(k, q, 0.07, negatives))
    rq, rk = torch.autograd.grad(ref, (q, k))
    torch.testing.assert_close(gq, rq, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gk, rk, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_detach_local_sends_no_gradient_to_local(symmetric):
    q, k = maps(2, 4, 2, 2, requires_grad=True)
    cross_level_contrast(q, k, symmetric=symmetric).backward()
    assert k.grad is None
    ref = original_patchnce(q, k.detach(), 0.07, "image")
    if symmetric:
        ref = 0.5 * (ref + original_patchnce(k.detach(), q, 0.07, "image"))
    (rq,) = torch.autograd.grad(ref, (q,))
    torch.testing.assert_close(q.grad, rq, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_contrast_gradcheck(symmetric):
    q, k = maps(2, 3, 1, 2, requires_grad=True)
    fn = lambda a, b: cross_level_contrast(  # noqa: E731
        a, b, negatives="batch", detach_local=False, symmetric=symmetric, temperature=0.5)
    assert torch.autograd.gradcheck(fn, (q, k))


# ---------------------------------------------------------------- contrast: bad input
@pytest.mark.parametrize("local,match", [
    (torch.randn(2, 4, 4, 4), "must match global_map's batch, channels and grid"),  # other grid
    (torch.randn(3, 4, 5, 5), "must match global_map's batch"),  # other batch
    (torch.randn(2, 3, 5, 5), "must match global_map's batch"),  # other channels
    (torch.randn(49, 4), r"\(B·gh·gw, C\) = \(50, 4\)"),  # too few rows
    (torch.randn(50, 4, 2, 2), "must match"),  # rows that are not pooled
    (torch.randn(2, 4, 25), "must match"),
])
def test_contrast_shape_errors(local, match):
    with pytest.raises(ValueError, match=match):
        cross_level_contrast(torch.randn(2, 4, 5, 5), local)


def test_contrast_other_errors():
    g = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"global_map must be \(B, C, gh, gw\)"):
        cross_level_contrast(g.flatten(2), g)
    with pytest.raises(TypeError, match="global_map must be a torch.Tensor"):
        cross_level_contrast(g.numpy(), g)
    with pytest.raises(TypeError, match="local_map must have a floating dtype"):
        cross_level_contrast(g, g.long())
    with pytest.raises(TypeError, match="local_map has dtype torch.float64 but global_map has torch.float32"):
        cross_level_contrast(g, g.double())
    with pytest.raises(ValueError, match="negatives must be one of 'image', 'batch'"):
        CrossLevelContrast(negatives="queue")
    with pytest.raises(ValueError, match="temperature must be positive"):
        CrossLevelContrast(temperature=0.0)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        cross_level_contrast(g, g, symmetric="yes")
    with pytest.raises(ValueError, match="NaN or Inf"):
        cross_level_contrast(g, torch.full_like(g, float("nan")))


# ---------------------------------------------------------------- consistency
def logits(b, k, gh, gw, ph, pw, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(b, k, gh * ph, gw * pw, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    patch = torch.randn(b * gh * gw, k, ph, pw, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    return patch, full


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("b", [1, 4])
def test_consistency_matches_original_times_cells(grid, b):
    patch, full = logits(b, 1, *grid, 3, 2)
    mean = CrossLevelConsistency()(patch, full)
    gh, gw = grid
    original = original_consistency_sum(patch, full, gh, gw)
    torch.testing.assert_close(mean * gh * gw, original, rtol=1e-12, atol=0)
    torch.testing.assert_close(mean, consistency_by_loops(patch, full, gh, gw), rtol=1e-12, atol=0)


@pytest.mark.parametrize("grid", GRIDS)
def test_consistency_softmax(grid):
    patch, full = logits(2, 3, *grid, 2, 2, seed=3)
    got = cross_level_consistency(patch, full, activation="softmax")
    expected = original_consistency_sum(patch, full, *grid, activation="softmax") / (grid[0] * grid[1])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_consistency_reductions_and_explicit_grid():
    patch, full = logits(2, 2, 3, 4, 2, 3)
    none = cross_level_consistency(patch, full, reduction="none", grid=(3, 4), activation="multilabel")
    assert none.shape == patch.shape
    torch.testing.assert_close(cross_level_consistency(patch, full, reduction="sum", activation="multilabel"),
                               none.sum())
    torch.testing.assert_close(cross_level_consistency(patch, full, activation="multilabel"), none.mean())


@pytest.mark.parametrize("detach_full", [True, False])
def test_consistency_gradients(detach_full):
    patch, full = logits(2, 1, 3, 4, 2, 2, requires_grad=True)
    cross_level_consistency(patch, full, detach_full=detach_full).backward()
    full_ref = full if not detach_full else full.detach()
    rp, *rf = torch.autograd.grad(original_consistency_sum(patch, full_ref, 3, 4) / 12,
                                  (patch,) if detach_full else (patch, full))
    torch.testing.assert_close(patch.grad, rp, rtol=1e-10, atol=1e-14)
    if detach_full:
        assert full.grad is None
    else:
        torch.testing.assert_close(full.grad, rf[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "multilabel"])
def test_consistency_gradcheck(activation):
    patch, full = logits(1, 1 if activation == "sigmoid" else 2, 2, 1, 1, 2, requires_grad=True)
    fn = lambda p, f: cross_level_consistency(p, f, activation=activation, detach_full=False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (patch, full))


def test_consistency_half_precision():
    patch, full = logits(2, 1, 5, 5, 4, 4)
    got = cross_level_consistency(patch.half(), full.half())
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got.double(), consistency_by_loops(patch, full, 5, 5), rtol=1e-2, atol=1e-3)


def test_consistency_errors():
    patch, full = logits(2, 1, 5, 5, 4, 4)
    with pytest.raises(ValueError, match=r"holds 49 patches .* needs B·gh·gw = 50"):
        cross_level_consistency(patch[:49], full)
    with pytest.raises(ValueError, match=r"patch size \(ph, pw\) = \(3, 4\) .* must divide .* \(20, 20\)"):
        cross_level_consistency(patch[..., :3, :], full)
    with pytest.raises(ValueError, match="2 classes but full_logits has 1"):
        cross_level_consistency(patch.repeat(1, 2, 1, 1), full)
    with pytest.raises(ValueError, match=r"grid \(4, 4\) does not match"):
        cross_level_consistency(patch, full, grid=4)
    with pytest.raises(ValueError, match=r"full_logits must be \(B, K, H, W\)"):
        cross_level_consistency(patch, full[0])
    with pytest.raises(ValueError, match="patch_logits contains NaN"):
        cross_level_consistency(patch * float("nan"), full)
    with pytest.raises(TypeError, match="patch_logits has dtype torch.float32 but full_logits"):
        cross_level_consistency(patch.float(), full)
    with pytest.raises(ValueError, match="activation must be one of"):
        CrossLevelConsistency(activation="relu")
    with pytest.raises(ValueError, match="reduction must be one of"):
        CrossLevelConsistency(reduction="max")


@pytest.mark.parametrize("grid", GRIDS)
def test_consistency_multilabel_is_a_sigmoid_per_channel(grid):
    patch, full = logits(2, 3, *grid, 2, 2, seed=4)
    got = cross_level_consistency(patch, full, activation="multilabel")
    # each channel on its own is the 1-channel (binary) loss; the mean over channels weighs them equally
    per_channel = [cross_level_consistency(patch[:, k:k + 1], full[:, k:k + 1]) for k in range(3)]
    torch.testing.assert_close(got, torch.stack(per_channel).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(got * grid[0] * grid[1], original_consistency_sum(patch, full, *grid),
                               rtol=1e-12, atol=0)


def test_consistency_refuses_logits_that_do_not_match_the_activation():
    patch, full = logits(2, 2, 2, 2, 3, 3)
    with pytest.raises(ValueError, match=r"activation='sigmoid' takes 1-channel .* got 2 channels.*"
                                         r"pass activation='softmax'.*activation='multilabel'"):
        CrossLevelConsistency()(patch, full)  # 2-channel softmax logits with the default
    binary, binary_full = logits(2, 1, 2, 2, 3, 3)
    with pytest.raises(ValueError, match=r"activation='softmax' needs K >= 2 .* pass activation='sigmoid'"):
        CrossLevelConsistency(activation="softmax")(binary, binary_full)


def test_consistency_accepts_tensor_subclasses_and_returns_plain_tensors():
    class Tagged(torch.Tensor):
        pass

    patch, full = logits(2, 1, 2, 2, 3, 3)
    want = cross_level_consistency(patch, full)
    got = cross_level_consistency(patch.as_subclass(Tagged), full.as_subclass(Tagged))
    assert type(got) is torch.Tensor and torch.equal(got, want)
