"""Any segmentation network as the losses see contrastkit's UNet: logits, a feature map, a projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .unet import UNetOutput


class ProjectionNet(nn.Module):
    """``net`` with a projection head on one of its layers (see :func:`with_projection`).

    ``forward(x)`` returns ``net``'s logits unchanged; ``forward(x, return_features=True)`` returns a
    :class:`~contrastkit.models.UNetOutput` ``(logits, features, projection)``: the hooked layer's
    output (upsampled to the input's size when ``upsample``) and a 1x1-conv projection of it, the
    protocol of :class:`~contrastkit.models.UNet` that :func:`contrastkit.cross_level_views` and
    the example pipelines read.
    """

    def __init__(self, net: nn.Module, layer: str, channels: int, proj_dim: int = 64, upsample: bool = True):
        super().__init__()
        self.net, self.layer, self.upsample = net, layer, upsample
        self.projector = nn.Sequential(
            nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True), nn.Conv2d(channels, proj_dim, 1))
        self._captured: torch.Tensor | None = None
        # The hook keeps the layer's output of the current forward; the network runs exactly as it
        # would without the wrapper (no re-implementation of its forward to reach the layer).
        net.get_submodule(layer).register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        self._captured = output

    def forward(self, x: torch.Tensor, return_features: bool = False):
        self._captured = None
        out = self.net(x)
        logits = _logits_of(out)
        if not return_features:
            return logits
        features, self._captured = self._captured, None
        if not isinstance(features, torch.Tensor) or features.dim() != 4:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"layer {self.layer!r} must output a (B, C, h, w) tensor during the forward; got {got}")
        if self.upsample and features.shape[-2:] != x.shape[-2:]:
            features = F.interpolate(features, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return UNetOutput(logits, features, self.projector(features))

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, upsample={self.upsample}"


def _logits_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]  # deep supervision: the full-resolution head first, by MONAI's convention
    raise TypeError(f"the network must return logits (a tensor, or .logits / ['logits']); got {type(out).__name__}")


def with_projection(net: nn.Module, layer: str, *, proj_dim: int = 64, channels: int | None = None,
                    example: torch.Tensor | None = None, upsample: bool = True) -> ProjectionNet:
    """Wrap any segmentation network so that the contrastive losses can read its features.

    Args:
        net: the network; its forward takes images and returns logits.
        layer: the name of the submodule whose output is the feature map (``net.get_submodule``):
            the decoder's last map for pixel-level losses. For contrastkit's ``UNet(depth=d)``
            ``f"up.{d - 1}"``; MONAI's ``BasicUNet`` ``"upcat_1"`` (full resolution); MONAI's
            ``UNet`` ``"model.1"`` (its last decoder tensor, at half resolution: upsampled).
        proj_dim: channels of the projection.
        channels: channels of the layer's output; read from the layer's ``out_channels`` when it
            has one, else from one forward of ``example`` (in eval mode, without gradient).
        example: an input to measure ``channels`` with, e.g. ``torch.zeros(1, 3, 64, 64)``.
        upsample: bring the features to the input's size (bilinear) when the layer is coarser.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be a torch.nn.Module; got {type(net).__name__}")
    names = dict(net.named_modules())
    if not isinstance(layer, str) or layer not in names or layer == "":
        children = [name for name, _ in net.named_children()]
        raise ValueError(f"layer must name a submodule of net (net.get_submodule(layer)); got {layer!r}; "
                         f"its top-level children are {children}")
    if isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 1:
        raise ValueError(f"proj_dim must be a positive int; got {proj_dim!r}")
    if channels is None:
        channels = getattr(names[layer], "out_channels", None)
    if channels is None and example is not None:
        channels = _measure_channels(net, names[layer], example)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels of layer {layer!r} unknown ({channels!r}): pass channels=C or an "
                         f"example input (example=torch.zeros(1, in_channels, H, W)) to measure them")
    return ProjectionNet(net, layer, channels, proj_dim, upsample)


def _measure_channels(net: nn.Module, module: nn.Module, example: torch.Tensor) -> int:
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    training = net.training
    try:
        net.eval()  # no BatchNorm statistics move for a measurement
        with torch.no_grad():
            net(example)
    finally:
        handle.remove()
        net.train(training)
    if not seen or not isinstance(seen[-1], torch.Tensor) or seen[-1].dim() != 4:
        raise ValueError("the layer produced no (B, C, h, w) tensor on the example input")
    return seen[-1].shape[1]
