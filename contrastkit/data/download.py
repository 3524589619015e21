"""Download public segmentation sets into the ``images/`` + ``masks/`` layout of SegmentationFolder."""

from __future__ import annotations

import hashlib
import shutil
import urllib.request
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .._optional import require
from .folder import IMAGE_EXTENSIONS

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    """One zip file of a data set.

    ``layout`` maps the name of the folder a file sits in inside the zip to the target folder
    (``"images"`` or ``"masks"``); the key ``"*"`` matches any folder. Only image files
    (IMAGE_EXTENSIONS) are extracted, flattened into ``root/<target>/<file name>``.
    ``sha256=None`` means no published checksum is known: the digest of the downloaded file is
    reported in a warning but not verified.
    """

    url: str
    filename: str
    layout: Mapping[str, str]
    sha256: str | None = None


@dataclass(frozen=True)
class DatasetSource:
    name: str
    archives: tuple[Archive, ...]
    mask_suffix: str = ""
    citation: str = ""
    terms: str = ""


REGISTRY: dict[str, DatasetSource] = {
    "kvasir-seg": DatasetSource(
        name="kvasir-seg",
        archives=(
            Archive(
                url="https://datasets.simula.no/downloads/kvasir-seg.zip",
                filename="kvasir-seg.zip",
                layout={"images": "images", "masks": "masks"},
            ),
        ),
        citation="Jha et al., Kvasir-SEG: A Segmented Polyp Dataset, MMM 2020",
        terms="research and education only; cite the paper",
    ),
    "isic2018": DatasetSource(
        name="isic2018",
        archives=(
            Archive(
                url="https://isic-challenge-data.s3.amazonaws.com/2018/ISIC2018_Task1-2_Training_Input.zip",
                filename="ISIC2018_Task1-2_Training_Input.zip",
                layout={"*": "images"},
            ),
            Archive(
                url="https://isic-challenge-data.s3.amazonaws.com/2018/ISIC2018_Task1_Training_GroundTruth.zip",
                filename="ISIC2018_Task1_Training_GroundTruth.zip",
                layout={"*": "masks"},
            ),
        ),
        mask_suffix="_segmentation",
        citation="Codella et al., arXiv:1902.03368, 2019; Tschandl et al., Sci. Data 5, 180161, 2018",
        terms="CC BY-NC 4.0; cite the challenge papers",
    ),
}


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, target: Path, progress: bool) -> str:
    """Stream ``url`` into ``target`` (through a .part file) and return its SHA-256."""
    tqdm = require("tqdm", "contrastkit.data.download").tqdm
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url) as response, partial.open("wb") as out:
            total = response.headers.get("Content-Length")
            with tqdm(
                total=int(total) if total else None,
                unit="B",
                unit_scale=True,
                desc=target.name,
                disable=not progress,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    return digest.hexdigest()


def _extract(archive_path: Path, layout: Mapping[str, str], root: Path) -> int:
    """Copy the image files of the zip into ``root/<target>/``; returns how many."""
    count = 0
    try:
        zf = zipfile.ZipFile(archive_path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{archive_path} is not a valid zip file: {err}") from err
    with zf:
        for info in zf.infolist():
            member = PurePosixPath(info.filename)
            if info.is_dir() or member.suffix.lower() not in IMAGE_EXTENSIONS or member.name.startswith("."):
                continue
            if "__MACOSX" in member.parts:
                continue
            folder = member.parent.name
            target = layout.get(folder, layout.get("*"))
            if target is None:
                continue
            # Only the base name is used, so no member can write outside root ("zip slip").
            destination = root / target / member.name
            destination.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, destination.open("wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
            count += 1
    return count


def _per_archive(name: str, value, n: int, default: list) -> list:
    if value is None:
        return default
    if isinstance(value, str):
        value = [value]
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} must give one entry per archive ({n}); got {len(value)}")
    return value


def download(
    name: str,
    root,
    *,
    url: str | Sequence[str] | None = None,
    sha256: str | Sequence[str | None] | None = None,
    progress: bool = True,
    keep_archives: bool = True,
    force: bool = False,
) -> Path:
    """Download data set ``name`` (a key of REGISTRY) into ``root/images`` and ``root/masks``.

    Archives go to ``root/downloads/`` and are reused when already there (``force=True``
    downloads again). Each is checked against its SHA-256 when one is known (registry entry
    or the ``sha256`` argument): a mismatch deletes the file and raises ValueError. When
    none is known the digest is reported in a UserWarning, not verified. ``url`` overrides
    the registry's URLs (one per archive; ``file://`` URLs work, which is how the tests run
    it offline). Returns ``root``; read it with ``SegmentationFolder(root,
    mask_suffix=REGISTRY[name].mask_suffix)``.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(REGISTRY)}")
    source = REGISTRY[name]
    n = len(source.archives)
    urls = _per_archive("url", url, n, [a.url for a in source.archives])
    checksums = _per_archive("sha256", sha256, n, [a.sha256 for a in source.archives])
    root = Path(root)
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    for archive, archive_url, expected in zip(source.archives, urls, checksums, strict=True):
        path = downloads / archive.filename
        if path.exists() and not force:
            actual = _sha256_of(path)
        else:
            actual = _fetch(archive_url, path, progress)
        if expected is not None and actual != expected.lower():
            path.unlink()
            raise ValueError(
                f"SHA-256 mismatch for {archive.filename} from {archive_url}: expected {expected}, "
                f"got {actual}; the file was deleted"
            )
        if expected is None:
            warnings.warn(
                f"{archive.filename}: sha256 {actual} (not verified: no published checksum is registered)",
                UserWarning,
                stacklevel=2,
            )
        if _extract(path, archive.layout, root) == 0:
            raise ValueError(f"{path} holds no image files in the folders {sorted(archive.layout)}")
        if not keep_archives:
            path.unlink()
    return root
