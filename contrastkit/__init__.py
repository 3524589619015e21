"""contrastkit: contrastive losses for semi-supervised medical image segmentation."""

from .classic import NTXentLoss, PatchNCELoss, SupConLoss, nt_xent_loss, patch_nce_loss, supcon_loss
from .core import info_nce
from .distributed import gather_keys
from .global_local import (
    GlobalContrast,
    LocalContrast,
    global_contrast,
    local_contrast,
    partition_of,
    sample_partition_slices,
)
from .patches import patchify, pool_patches, unpatchify
from .queue import MemoryQueue

__version__ = "0.1.0"

__all__ = [
    "info_nce", "patchify", "pool_patches", "unpatchify",
    "NTXentLoss", "SupConLoss", "PatchNCELoss", "GlobalContrast", "LocalContrast", "MemoryQueue",
    "nt_xent_loss", "supcon_loss", "patch_nce_loss", "global_contrast", "local_contrast",
    "sample_partition_slices", "partition_of", "gather_keys",
]
