"""Small reference networks for the examples and tests."""

from .unet import UNet, UNetOutput

__all__ = ["UNet", "UNetOutput"]
