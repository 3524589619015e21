"""A segmentation data set stored as an ``images/`` folder and a ``masks/`` folder.

This is the layout of Kvasir-SEG, CVC-ClinicDB and ISIC 2018 (after extraction):
``root/images/<id>.<ext>`` and ``root/masks/<id><mask_suffix>.<ext>``. How a mask file becomes
foreground and background is told in :class:`SegmentationFolder`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .._optional import require
from .paths import is_hidden

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
#: A mask pixel is foreground when its value on the 0..255 scale is above this (see SegmentationFolder).
MASK_THRESHOLD = 127

# PIL modes by how a mask's per-pixel value is taken; alpha is never part of it.
_GREY_MODES = ("1", "L", "LA", "La")
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA")
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


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
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS or is_hidden(path):
            continue
        if path.stem in found:
            raise ValueError(f"two files share the stem {path.stem!r}: {found[path.stem]} and {path}")
        found[path.stem] = path
    return found


def _open(path: Path, mode: str | None = None):
    """The decoded image at ``path``, converted to ``mode`` (None: as stored, palette and bit depth kept)."""
    image_module = require("PIL.Image", "SegmentationFolder")
    try:
        with image_module.open(path) as img:
            img.load()  # decode now so a truncated file fails here, with its name
            return img.copy() if mode is None else img.convert(mode)
    except (OSError, ValueError, SyntaxError) as err:
        raise OSError(f"cannot read image file {path}: {err}") from err


def _mask_levels(mask, path: Path) -> np.ndarray:
    """Per-pixel mask values: the grey level, or the largest of R, G, B (palette: of the entry's colour).

    The largest channel rather than PIL's luma, because luma puts pure blue at 29 and pure red at 76, below
    any sensible threshold, so a coloured mask would read as empty.
    """
    if mask.mode in _GREY_MODES:
        return np.asarray(mask.convert("L"))
    if mask.mode in _COLOUR_MODES:
        if mask.mode in ("P", "PA"):
            _check_palette(mask, path)
        return np.asarray(mask.convert("RGB")).max(axis=2)
    if mask.mode in _WIDE_MODES:
        levels = np.asarray(mask).astype(np.int64)
        if levels.size and (levels.min() < 0 or levels.max() > 65535):
            raise ValueError(f"mask {path}: expected values in 0..65535; got {levels.min()}..{levels.max()}")
        return levels
    raise ValueError(f"mask {path}: PIL mode {mask.mode!r} is not a mask encoding; expected grey "
                     f"({', '.join(_GREY_MODES)}), colour or palette ({', '.join(_COLOUR_MODES)}) or 16/32-bit grey "
                     f"({', '.join(_WIDE_MODES)})")


def _check_palette(mask, path: Path) -> None:
    """Refuse palette indices without a palette entry: PIL shows them black, so a mask written as raw 0/1
    indices with no palette would read as empty while its pixels say otherwise."""
    indices = np.asarray(mask.getchannel("P"))
    entries = len(mask.getpalette("RGB") or []) // 3
    if indices.size and int(indices.max()) >= entries:
        raise ValueError(f"mask {path}: pixels use palette index {int(indices.max())} but the palette has "
                         f"{entries} colours; expected every index used to have a colour (save the mask as grey "
                         "'L' 0/255 or 0/1 instead)")


def _binary_mask(levels: np.ndarray, threshold: int, path: Path) -> np.ndarray:
    """{0, 1} uint8 foreground of mask values ``levels`` (see the rule in SegmentationFolder)."""
    top = int(levels.max()) if levels.size else 0
    if top <= 1:  # a 0/1 label map: the value is the class
        return (levels == 1).astype(np.uint8)
    cut = threshold if top <= 255 else threshold * 257  # 16-bit 0..65535: the same fraction of the range
    binary = (levels > cut).astype(np.uint8)
    if not binary.any():
        # A 0/1 mask saved as JPEG (noise adds 2s) or a label map with ids 0, 1, 2: reading it as empty would
        # silently drop the lesion.
        raise ValueError(f"mask {path}: values reach {top} but none exceeds the threshold {cut}, so nothing would "
                         "be foreground; expected 0/1 or 0/255 (16-bit: 0/65535) binary masks")
    return binary


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
        threshold: a mask pixel is foreground when its value (0..255 scale) is ``> threshold``
            (default 127; JPEG masks like Kvasir-SEG's carry compression noise at the edges).
        transform: optional ``f(image, mask) -> (image, mask)`` applied to each sample.

    Masks are read in their stored encoding, by one rule:

    1. Each pixel's value is its grey level (8-bit ``L``/``1``, 16-bit ``I;16``, 32-bit ``I``), or the
       largest of R, G, B for a colour mask, and for a palette (``P``) mask of the colour its index stands
       for (what a viewer shows; palette index order is arbitrary in many editors). Alpha is ignored.
    2. When no value exceeds 1, the mask is a 0/1 label map: 1 is foreground (8- or 16-bit).
    3. Otherwise a pixel is foreground when its value is ``> threshold``: 0/255 grey, pure red (255, 0, 0)
       and other saturated colours count. A 16-bit mask with values above 255 is on the 0..65535 scale
       and compared with ``threshold * 257``.
    4. Refused with ValueError naming the file: a mask with values above 1 but none above the threshold
       (a lossy 0/1 mask, a label map 0/1/2: empty would silently drop a lesion), palette indices without
       a palette colour, 16/32-bit values outside 0..65535, and other PIL modes (CMYK, YCbCr, float).

    Hidden files (a leading dot, e.g. macOS ``._<name>`` copies) in either folder are skipped.

    Item ``i`` is ``(image, mask)``: image float32 (3, H, W) in [0, 1] (RGB), mask float32
    (1, H, W) with values {0., 1.}, the shape and dtype ``binary_cross_entropy_with_logits``
    takes next to (B, 1, H, W) logits; ``mask.long().squeeze(0)`` gives class indices.
    ``self.ids[i]`` is its id. All pairs are located when the data set is built, so a missing
    mask fails at once; an unreadable file raises OSError naming it when it is loaded, a mask the
    rule above refuses a ValueError naming it.
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
        mask_path = self.mask_paths[index]
        mask = _open(mask_path)
        if image.size != mask.size:
            raise ValueError(
                f"image {self.image_paths[index]} is {image.size[::-1]} but its mask "
                f"{mask_path} is {mask.size[::-1]} (H, W)"
            )
        binary = _binary_mask(_mask_levels(mask, mask_path), self.threshold, mask_path)
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
