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
from .labels import downsample_labels, pseudo_labels
from .patches import patchify, pool_patches, unpatchify
from .pseudo_label import PseudoLabelContrast, pseudo_label_contrast

__version__ = "0.1.0"

__all__ = [
    "info_nce",
    "models",
    # patch utilities
    "patchify",
    "pool_patches",
    "unpatchify",
    # cross-level contrast and consistency
    "CrossLevelConsistency",
    "CrossLevelContrast",
    "CrossLevelViews",
    "cross_level_consistency",
    "cross_level_contrast",
    "cross_level_views",
    # pseudo-label contrast
    "PseudoLabelContrast",
    "pseudo_label_contrast",
    "pseudo_labels",
    "downsample_labels",
]
