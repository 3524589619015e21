"""contrastkit: contrastive losses for semi-supervised medical image segmentation."""

from .core import info_nce
from .labels import downsample_labels, pseudo_labels
from .patches import patchify, pool_patches, unpatchify
from .pseudo_label import PseudoLabelContrast, pseudo_label_contrast

__version__ = "0.1.0"

__all__ = [
    "info_nce",
    "patchify",
    "pool_patches",
    "unpatchify",
    "PseudoLabelContrast",
    "pseudo_label_contrast",
    "pseudo_labels",
    "downsample_labels",
]
