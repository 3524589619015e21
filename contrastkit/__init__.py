"""contrastkit: contrastive losses for semi-supervised medical image segmentation."""

from . import data, metrics, models, segmentation, training
from ._options import SHARED, InfoNCEOptions
from ._temperature import TemperatureModule
from ._validation import set_value_checks, value_checks, value_checks_enabled
from .classic import NTXentLoss, PatchNCELoss, SupConLoss, nt_xent_loss, patch_nce_loss, supcon_loss
from .core import info_nce
from .cross_level import (
    PATCH_BATCHNORM,
    CrossLevelConsistency,
    CrossLevelContrast,
    CrossLevelViews,
    batchnorm_mode,
    cross_level_consistency,
    cross_level_contrast,
    cross_level_views,
)
from .distributed import gather_keys
from .global_local import (
    GlobalContrast,
    LocalContrast,
    global_contrast,
    local_contrast,
    partition_of,
    sample_partition_slices,
)
from .labels import downsample_labels, pseudo_labels
from .patches import patchify, pool_patches, unpatchify
from .pseudo_label import PseudoLabelContrast, pseudo_label_contrast, sample_pixels
from .queue import MemoryQueue, append_queue

__version__ = "0.1.0"

__all__ = [
    "set_value_checks",
    "value_checks",
    "value_checks_enabled",
    "info_nce",
    "InfoNCEOptions",
    "SHARED",
    "TemperatureModule",
    "data",
    "metrics",
    "models",
    "segmentation",
    "training",
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
    "batchnorm_mode",
    "PATCH_BATCHNORM",
    # pseudo-label contrast
    "PseudoLabelContrast",
    "pseudo_label_contrast",
    "sample_pixels",
    "pseudo_labels",
    "downsample_labels",
    # the classic family
    "NTXentLoss",
    "SupConLoss",
    "PatchNCELoss",
    "GlobalContrast",
    "LocalContrast",
    "nt_xent_loss",
    "supcon_loss",
    "patch_nce_loss",
    "global_contrast",
    "local_contrast",
    "sample_partition_slices",
    "partition_of",
    # memory queue and multi-process gathering
    "MemoryQueue",
    "append_queue",
    "gather_keys",
]
