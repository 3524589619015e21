"""A segmentation data set stored as an ``images/`` folder and a ``masks/`` folder.

This is the layout of Kvasir-SEG, CVC-ClinicDB and ISIC 2018 (after extraction):
``root/images/<id>.<ext>`` and ``root/masks/<id><mask_suffix>.<ext>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .._optional import require

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
#: A mask pixel is foreground when its grey value (0..255, PIL ``"L"`` conversion) is above this.
MASK_THRESHOLD = 127


def as_size(size) -> tuple[int, int] | None:
    """None, an int or an (H, W) pair of positive ints -> None or (H, W)."""
    if size is None:
        return None
    if isinstance(size, bool):
        raise TypeError("size must be None, an int or an (H, W) pair of ints; got bool")
    if isinstance(size, int):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)
    ):
        raise TypeError(f"size must be None, an int or an (H, W) pair of ints; got {size!r}")
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"size must be positive; got {tuple(size)}")
    return int(size[0]), int(size[1])


def _files_by_stem(folder: Path) -> dict[str, Path]:
    """Image files of ``folder`` keyed by file stem; two files with one stem are an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.stem in found:
            raise ValueError(f"two files share the stem {path.stem!r}: {found[path.stem]} and {path}")
        found[path.stem] = path
    return found


def _open(path: Path, mode: str):
    image_module = require("PIL.Image", "SegmentationFolder")
    try:
        with image_module.open(path) as img:
            img.load()  # decode now so a truncated file fails here, with its name
            return img.convert(mode)
    except (OSError, ValueError, SyntaxError) as err:
        raise OSError(f"cannot read image file {path}: {err}") from err


class SegmentationFolder(Dataset):
    """Image/mask pairs from ``root/images`` and ``root/masks``, matched by file stem.

    Args:
        root: folder holding ``image_dir`` and ``mask_dir``.
        size: None (keep the stored size), an int or (H, W). Images are resized bilinearly,
            masks with nearest neighbour after thresholding, so masks stay binary.
        ids: the sample ids (file stems) to use, in this order (e.g. one part of a split);
            None uses every image, sorted by id. Unknown ids raise ValueError.
        mask_suffix: the mask of image ``<id>`` is ``<id><mask_suffix>.<ext>``
            (``"_segmentation"`` for ISIC 2018). Any extension in IMAGE_EXTENSIONS is accepted.
        threshold: a mask pixel is foreground when its grey value (0..255) is ``> threshold``
            (default 127; JPEG masks like Kvasir-SEG's carry compression noise at the edges).
        transform: optional ``f(image, mask) -> (image, mask)`` applied to each sample.

    Item ``i`` is ``(image, mask)``: image float32 (3, H, W) in [0, 1] (RGB), mask float32
    (1, H, W) with values {0., 1.}, the shape and dtype ``binary_cross_entropy_with_logits``
    takes next to (B, 1, H, W) logits; ``mask.long().squeeze(0)`` gives class indices.
    ``self.ids[i]`` is its id. All pairs are located when the data set is built, so a missing
    mask fails at once; an unreadable file raises OSError naming it when it is loaded.
    """

    def __init__(
        self,
        root,
        size=None,
        *,
        ids: Sequence[str] | None = None,
        image_dir: str = "images",
        mask_dir: str = "masks",
        mask_suffix: str = "",
        threshold: int = MASK_THRESHOLD,
        transform: Callable | None = None,
    ) -> None:
        self.root = Path(root)
        self.size = as_size(size)
        if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 <= threshold < 255:
            raise ValueError(f"threshold must be an int in [0, 254]; got {threshold!r}")
        self.threshold = threshold
        self.transform = transform
        image_folder, mask_folder = self.root / image_dir, self.root / mask_dir
        for folder in (image_folder, mask_folder):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"folder {folder} does not exist (expected {image_dir}/ and {mask_dir}/)"
                )
        images = _files_by_stem(image_folder)
        if not images:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {image_folder}")
        masks = _files_by_stem(mask_folder)
        if ids is None:
            ids = sorted(images)
        else:
            if isinstance(ids, str):
                raise TypeError("ids must be a sequence of id strings, not one string")
            ids = [str(i) for i in ids]
            unknown = [i for i in ids if i not in images]
            if unknown:
                raise ValueError(f"{len(unknown)} ids have no image in {image_folder}, e.g. {unknown[:3]}")
            if not ids:
                raise ValueError("ids is empty: a data set needs at least one sample")
        self.ids: list[str] = list(ids)
        self.image_paths = [images[i] for i in self.ids]
        self.mask_paths = []
        for sample_id, image_path in zip(self.ids, self.image_paths, strict=True):
            mask_path = masks.get(sample_id + mask_suffix)
            if mask_path is None:
                raise FileNotFoundError(
                    f"image {image_path} has no mask {mask_folder / (sample_id + mask_suffix)}.<ext>"
                )
            self.mask_paths.append(mask_path)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` as uint8 arrays at output size: image (H, W, 3), mask (H, W) in {0, 1}."""
        image_module = require("PIL.Image", "SegmentationFolder")
        image = _open(self.image_paths[index], "RGB")
        mask = _open(self.mask_paths[index], "L")
        if image.size != mask.size:
            raise ValueError(
                f"image {self.image_paths[index]} is {image.size[::-1]} but its mask "
                f"{self.mask_paths[index]} is {mask.size[::-1]} (H, W)"
            )
        binary = (np.asarray(mask) > self.threshold).astype(np.uint8)
        if self.size is not None:
            wh = (self.size[1], self.size[0])
            image = image.resize(wh, image_module.Resampling.BILINEAR)
            binary = np.array(image_module.fromarray(binary).resize(wh, image_module.Resampling.NEAREST))
        return np.array(image), binary  # np.array copies: torch wants writable memory

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        image_t = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
        mask_t = torch.from_numpy(mask).unsqueeze(0).float()
        if self.transform is not None:
            image_t, mask_t = self.transform(image_t, mask_t)
        return image_t, mask_t

    def __repr__(self) -> str:
        return f"SegmentationFolder(root={str(self.root)!r}, n={len(self)}, size={self.size})"
