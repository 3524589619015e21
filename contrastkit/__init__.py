"""contrastkit: contrastive losses for semi-supervised medical image segmentation."""

from . import models
from .core import info_nce
from .cross_level import (
    CrossLevelConsistency,
    CrossLevelContrast,
    CrossLevelViews,
    cross_level_consistency,
    cross_level_contrast,
    cross_level_views,
)
from .patches import patchify, pool_patches, unpatchify

__version__ = "0.1.0"

__all__ = [
    "CrossLevelConsistency",
    "CrossLevelContrast",
    "CrossLevelViews",
    "cross_level_consistency",
    "cross_level_contrast",
    "cross_level_views",
    "info_nce",
    "models",
    "patchify",
    "pool_patches",
    "unpatchify",
]
