"""contrastkit.models.UNet and the cross_level_views training-step helper."""

import pytest
import torch

import contrastkit
from contrastkit import CrossLevelConsistency, CrossLevelContrast, cross_level_views, patchify
from contrastkit.models import UNet, UNetOutput


def small_unet(**kw):
    torch.manual_seed(0)
    return UNet(**{"in_channels": 3, "num_classes": 2, "base_width": 4, "depth": 2, "proj_dim": 6, **kw})


def test_importable_as_subpackage():
    assert contrastkit.models.UNet is UNet


@pytest.mark.parametrize(
    "depth,size", [(0, (5, 7)), (1, (6, 10)), (2, (16, 16)), (2, (8, 24)), (3, (16, 32))]
)
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_shapes(depth, size, norm):
    model = small_unet(depth=depth, norm=norm)
    x = torch.randn(2, 3, *size)
    assert model(x).shape == (2, 2, *size)
    out = model(x, return_features=True)
    assert isinstance(out, UNetOutput)
    assert out.logits.shape == (2, 2, *size)
    assert out.features.shape == (2, 4, *size)
    assert out.projection.shape == (2, 6, *size)


def test_logits_are_the_same_with_and_without_features():
    model = small_unet().eval()
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(model(x), model(x, return_features=True).logits, rtol=0, atol=0)


def test_runs_on_patches():
    model = small_unet().eval()
    patches = patchify(torch.randn(2, 3, 20, 20), 5)  # 4x4 patches, divisible by 2^2
    out = model(patches, return_features=True)
    assert out.logits.shape == (50, 2, 4, 4) and out.projection.shape == (50, 6, 4, 4)


def test_bad_input():
    model = small_unet(depth=3)
    with pytest.raises(ValueError, match=r"\(H, W\) = \(20, 16\) must be positive multiples of 2\^depth = 8"):
        model(torch.randn(1, 3, 20, 16))
    with pytest.raises(ValueError, match="x has 1 channels but the UNet expects in_channels=3"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"x must be a \(B, C, H, W\) tensor"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="depth must be a non-negative int"):
        UNet(depth=-1)
    with pytest.raises(ValueError, match="base_width must be a positive int"):
        UNet(base_width=0)
    with pytest.raises(ValueError, match="norm must be 'batch' or 'group'"):
        UNet(norm="layer")


def test_views_are_the_pooled_model_outputs():
    model = small_unet().eval()
    images = torch.randn(2, 3, 24, 32)
    views = cross_level_views(model, images, (3, 2))
    full, patches = model(images, return_features=True), model(patchify(images, (3, 2)), return_features=True)
    torch.testing.assert_close(views.full_logits, full.logits)
    torch.testing.assert_close(views.patch_logits, patches.logits)
    # Global cell (r, s) of image b is the mean of the full projection over that cell's region.
    region = full.projection[1, :, 8:16, 16:32]
    torch.testing.assert_close(views.global_map[1, :, 1, 1], region.mean(dim=(1, 2)))
    torch.testing.assert_close(views.local_map, patches.projection.mean(dim=(2, 3)))
    torch.testing.assert_close(views.full_projection, full.projection)  # for a pixel-level loss beside


def test_batchnorm_mode_is_public_and_keeps_running_statistics_for_the_full_images():
    model = small_unet(norm="batch").train()
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = norm.running_mean.clone()
    with contrastkit.batchnorm_mode(model, "batch_no_update"):
        model(torch.randn(2, 3, 16, 16) * 5 + 3)
    assert torch.equal(norm.running_mean, before) and norm.momentum == 0.1 and model.training
    assert contrastkit.PATCH_BATCHNORM == ("batch", "batch_no_update", "running")


def test_views_reject_models_without_features():
    with pytest.raises(TypeError, match=r"must return an object with .logits and .projection"):
        cross_level_views(lambda x, return_features: x, torch.randn(1, 3, 8, 8), 2)


def test_views_accept_dict_outputs():
    model = small_unet().eval()
    as_dict = lambda x, return_features: model(x, return_features=True)._asdict()  # noqa: E731
    views = cross_level_views(as_dict, torch.randn(1, 3, 16, 16), 2)
    assert views.local_map.shape == (4, 6) and views.global_map.shape == (1, 6, 2, 2)


@pytest.mark.parametrize("warm_up", [True, False])
def test_one_training_step(warm_up):
    model = small_unet(num_classes=1)
    images, masks, labeled = torch.randn(4, 3, 16, 16), torch.rand(2, 1, 16, 16).round(), 2
    views = cross_level_views(model, images, 2)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(views.full_logits[:labeled], masks)
    if warm_up:
        loss = loss + 0.1 * CrossLevelContrast()(views.global_map, views.local_map)
    else:
        loss = loss + 0.1 * CrossLevelConsistency()(views.patch_logits, views.full_logits)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    head_grad = model.projector[-1].weight.grad
    # The contrast trains the projection head; the consistency (on logits) leaves it untouched.
    assert (head_grad is not None and head_grad.abs().sum() > 0) == warm_up
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_patch_batchnorm_modes_control_the_running_statistics():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16) * 4 + 1  # patches and images with different statistics after pooling
    running = {}
    for mode in ("batch", "batch_no_update", "running"):
        torch.manual_seed(1)
        model = UNet(3, 1, base_width=4, depth=2, proj_dim=4)
        full_only = UNet(3, 1, base_width=4, depth=2, proj_dim=4)
        full_only.load_state_dict(model.state_dict())
        views = cross_level_views(model, images, 2, patch_batchnorm=mode)
        full_only(images, return_features=True)
        bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        bn_full = [m for m in full_only.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        same = all(torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
                   for a, b in zip(bn, bn_full, strict=True))
        running[mode] = same
        assert all(m.training for m in bn) and all(m.momentum == 0.1 for m in bn)  # restored
        if mode == "running":  # the patch pass is a test-time pass over the patches, with gradients
            model.eval()
            with torch.no_grad():
                want = model(patchify(images, 2))
            torch.testing.assert_close(views.patch_logits.detach(), want)
            assert views.patch_logits.requires_grad
    # only "batch" lets the patches into the running statistics
    assert running == {"batch": False, "batch_no_update": True, "running": True}
    # the default keeps the running statistics the full images'
    torch.manual_seed(1)
    model, full_only = UNet(3, 1, base_width=4, depth=2, proj_dim=4), UNet(3, 1, base_width=4, depth=2, proj_dim=4)
    full_only.load_state_dict(model.state_dict())
    cross_level_views(model, images, 2)
    full_only(images, return_features=True)
    for a, b in zip(model.modules(), full_only.modules(), strict=True):
        if isinstance(a, torch.nn.BatchNorm2d):  # (num_batches_tracked counts both passes)
            torch.testing.assert_close(a.running_mean, b.running_mean)
            torch.testing.assert_close(a.running_var, b.running_var)
    with pytest.raises(ValueError, match="patch_batchnorm"):
        cross_level_views(model, images, 2, patch_batchnorm="sync")
