"""contrastkit: contrastive losses for semi-supervised medical image segmentation."""

from . import data, metrics
from .core import info_nce
from .patches import patchify, pool_patches, unpatchify

__version__ = "0.1.0"

__all__ = ["data", "metrics", "info_nce", "patchify", "pool_patches", "unpatchify"]
