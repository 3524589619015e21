"""Pack a data set into a compact copy for a machine without the shared data (e.g. a lent GPU).

    python examples/pack_data.py kvasir-seg ../shared/data/kvasir-seg runs/pack/kvasir-seg
    python examples/pack_data.py acdc ../shared/data/acdc runs/pack/acdc

The copy is read back by the same data classes (``SegmentationFolder``, ``ACDCSlices``,
``ACDCVolumes``) in the same layout. Conversions, all stated in the copy's ``PACKED.json``:

- kvasir-seg: images keep their JPEG bytes (no re-encoding); masks, RGB JPEGs in the source, are
  thresholded at > 127 (the rule ``SegmentationFolder`` applies) and stored as 1-bit PNGs.
- acdc: images, float32 in 0..1, are quantised to 128 levels, round(127 x), stored as uint8 with a
  ``scale`` attribute of 1/127 that the readers apply (error <= 1/254 of the range, below the
  images' noise; 8 bits would not fit), labels as uint8, each HDF5 dataset gzip-compressed; the
  list files are copied.

A copy must fit the device tool's 64 MiB together with the code (about 1.2 MB): Kvasir-SEG packs
to about 25 MiB and ACDC to about 55 MiB, so one data set goes per device call.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np


def pack_kvasir(src: Path, dst: Path) -> dict:
    from PIL import Image

    from contrastkit.data import MASK_THRESHOLD, SegmentationFolder

    folder = SegmentationFolder(src)  # checks the layout and pairs images with masks
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    for image, mask, sample in zip(folder.image_paths, folder.mask_paths, folder.ids, strict=True):
        shutil.copyfile(image, dst / "images" / image.name)
        binary = np.asarray(Image.open(mask).convert("L")) > MASK_THRESHOLD
        Image.fromarray(binary).save(dst / "masks" / f"{sample}.png", optimize=True)
    return {"images": len(folder), "conversion": "images: original JPEG bytes; masks: > 127 -> 1-bit PNG"}


def pack_acdc(src: Path, dst: Path) -> dict:
    import h5py

    count = 0
    for path in [*sorted((src / "data").glob("*.h5")), *sorted((src / "data" / "slices").glob("*.h5"))]:
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "r") as f:
            image, label = f["image"][()], f["label"][()]
        with h5py.File(out, "w") as f:
            levels = f.create_dataset("image", data=np.round(np.clip(image, 0, 1) * LEVELS).astype(np.uint8),
                                      compression="gzip", compression_opts=9)
            levels.attrs["scale"] = 1 / LEVELS
            f.create_dataset("label", data=label.astype(np.uint8), compression="gzip", compression_opts=9)
        count += 1
    for path in sorted(src.glob("*.list")):
        shutil.copyfile(path, dst / path.name)
    return {"files": count, "conversion": f"image float32 0..1 -> uint8 round({LEVELS} x) with scale 1/{LEVELS}, "
                                          "gzip 9; label uint8, gzip 9"}


LEVELS = 127  # 7 bits: 8 would not fit ACDC with the code into 64 MiB

PACKERS = {"kvasir-seg": pack_kvasir, "acdc": pack_acdc}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(PACKERS))
    parser.add_argument("src", type=Path, help="the data set's folder")
    parser.add_argument("dst", type=Path, help="where the copy goes (created; must not exist or be empty)")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"src {args.src} is not a folder")
    if args.dst.exists() and any(args.dst.iterdir()):
        parser.error(f"dst {args.dst} exists and is not empty")
    args.dst.mkdir(parents=True, exist_ok=True)
    facts = PACKERS[args.dataset](args.src, args.dst)
    size = sum(p.stat().st_size for p in args.dst.rglob("*") if p.is_file())
    facts.update(dataset=args.dataset, source=str(args.src), bytes=size)
    (args.dst / "PACKED.json").write_text(json.dumps(facts, indent=2))
    print(f"packed {args.dataset} into {args.dst}: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
