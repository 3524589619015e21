"""with_projection: any network's layer as the feature map, a projection head, UNet's return protocol."""

import pytest
import torch
import torch.nn.functional as F

from contrastkit import cross_level_views
from contrastkit.models import ProjectionNet, UNet, UNetOutput, with_projection


def test_hooking_the_unets_last_decoder_layer_gives_its_own_features():
    torch.manual_seed(0)
    net = UNet(3, 2, base_width=4, depth=2, proj_dim=5, norm="group")
    wrapped = with_projection(net, "up.1", proj_dim=6, example=torch.zeros(1, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    own = net(x, return_features=True)
    out = wrapped(x, return_features=True)
    assert isinstance(out, UNetOutput)
    assert torch.equal(out.logits, own.logits) and torch.equal(out.features, own.features)
    assert out.projection.shape == (2, 6, 16, 16)
    torch.testing.assert_close(out.projection, wrapped.projector(own.features))
    assert torch.equal(wrapped(x), own.logits)  # without return_features: the network's logits


def test_a_coarser_layer_is_upsampled_to_the_input_and_gradients_reach_the_network():
    torch.manual_seed(1)
    net = UNet(3, 1, base_width=4, depth=2, norm="group")
    seen = []
    net.down[1].register_forward_hook(lambda m, i, o: seen.append(o))
    wrapped = with_projection(net, "down.1", channels=8, proj_dim=3)
    x = torch.randn(2, 3, 16, 16)
    out = wrapped(x, return_features=True)
    want = F.interpolate(seen[-1], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.features, want)
    out.projection.square().mean().backward()
    assert net.down[0][0].weight.grad is not None and net.down[0][0].weight.grad.abs().sum() > 0
    coarse = with_projection(net, "down.1", channels=8, upsample=False)(x, return_features=True)
    assert coarse.features.shape == (2, 8, 8, 8)


def test_measuring_the_channels_moves_no_batchnorm_statistics_and_keeps_the_mode():
    net = UNet(3, 1, base_width=4, depth=1, norm="batch").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    wrapped = with_projection(net, "up.0", example=torch.randn(2, 3, 8, 8))
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(wrapped, ProjectionNet) and wrapped.projector[0].in_channels == 4


def test_bad_arguments_are_named():
    net = UNet(3, 1, base_width=4, depth=1)
    with pytest.raises(ValueError, match=r"layer must name a submodule.*'down', 'pool', 'up'"):
        with_projection(net, "decoder")
    with pytest.raises(ValueError, match="channels of layer 'up.0' unknown"):
        with_projection(net, "up.0")
    with pytest.raises(ValueError, match="proj_dim must be a positive int"):
        with_projection(net, "up.0", channels=4, proj_dim=0)
    with pytest.raises(TypeError, match="net must be a torch.nn.Module"):
        with_projection(lambda x: x, "up.0")


@pytest.mark.parametrize("kind", ["BasicUNet", "UNet"])
def test_monai_networks_feed_cross_level_views(kind):
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(2)
    if kind == "BasicUNet":
        net = nets.BasicUNet(spatial_dims=2, in_channels=3, out_channels=1, features=(4, 4, 8, 8, 16, 4))
        layer = "upcat_1"
    else:
        net = nets.UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(4, 8, 16), strides=(2, 2))
        layer = "model.1"  # the last decoder tensor, at half resolution
    wrapped = with_projection(net, layer, proj_dim=8, example=torch.zeros(1, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    out = wrapped(x, return_features=True)
    assert out.logits.shape == (2, 1, 64, 64) and out.projection.shape == (2, 8, 64, 64)
    torch.testing.assert_close(out.logits, net(x))
    views = cross_level_views(wrapped, x, grid=2)
    assert views.global_map.shape == (2, 8, 2, 2) and views.local_map.shape == (8, 8)
    assert views.patch_logits.shape == (8, 1, 32, 32)
