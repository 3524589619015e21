"""Data utilities for the segmentation examples: folders, splits, sampling, augmentation, synthetic data.

Importing this package needs only the core dependencies; Pillow (SegmentationFolder),
kornia (PairedAugment) and tqdm (download) are imported when first used, and raise an
ImportError naming the ``contrastkit[examples]`` extra when missing. See docs/data.md.
"""

from .augment import PairedAugment
from .download import REGISTRY, Archive, DatasetSource, download
from .folder import IMAGE_EXTENSIONS, MASK_THRESHOLD, SegmentationFolder
from .paths import shared_data_root
from .sampler import TwoStreamBatchSampler
from .splits import Split, make_split
from .synthetic_polyps import SyntheticPolyps

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_THRESHOLD",
    "REGISTRY",
    "Archive",
    "DatasetSource",
    "PairedAugment",
    "SegmentationFolder",
    "Split",
    "SyntheticPolyps",
    "TwoStreamBatchSampler",
    "download",
    "make_split",
    "shared_data_root",
]
