"""Data utilities for the segmentation examples: folders, splits, sampling, augmentation, synthetic data.

Importing this package needs only the core dependencies; Pillow (SegmentationFolder),
kornia (PairedAugment), tqdm (download), h5py (ACDC HDF5) and nibabel (NIfTI) are imported
when first used, and raise an ImportError naming the ``contrastkit[examples]`` extra when
missing. See docs/data.md.
"""

from .acdc import (
    ACDCSlices,
    ACDCVolumes,
    acdc_patient_split,
    find_acdc_root,
    fit_size,
    patient_id,
    predict_volume,
    restore_size,
    split_by_patient,
    volume_id,
)
from .augment import PairedAugment
from .download import REGISTRY, Archive, DatasetSource, download
from .folder import IMAGE_EXTENSIONS, MASK_THRESHOLD, SegmentationFolder
from .nifti import (
    LAYOUTS,
    NiftiSlices,
    NiftiVolumes,
    detect_layout,
    nifti_patient_split,
    nifti_slice_names,
    nifti_split,
)
from .paths import shared_data_root
from .sampler import TwoStreamBatchSampler
from .splits import Split, make_split
from .synthetic_cardiac import SyntheticCardiac, SyntheticCardiacVolumes, synthetic_cardiac_slice
from .synthetic_polyps import SyntheticPolyps
from .volumes import PartitionBatchSampler, slice_positions

__all__ = [
    "ACDCSlices",
    "ACDCVolumes",
    "SyntheticCardiac",
    "SyntheticCardiacVolumes",
    "acdc_patient_split",
    "find_acdc_root",
    "fit_size",
    "patient_id",
    "predict_volume",
    "restore_size",
    "split_by_patient",
    "synthetic_cardiac_slice",
    "volume_id",
    "LAYOUTS",
    "NiftiSlices",
    "NiftiVolumes",
    "detect_layout",
    "nifti_patient_split",
    "nifti_slice_names",
    "nifti_split",
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
    "PartitionBatchSampler",
    "slice_positions",
    "download",
    "make_split",
    "shared_data_root",
]
