"""Small reference networks for the examples and tests, and a wrapper that gives any network their
protocol (logits, features, projection)."""

from .projection import ProjectionNet, with_projection
from .unet import UNet, UNetOutput

__all__ = ["ProjectionNet", "UNet", "UNetOutput", "with_projection"]
