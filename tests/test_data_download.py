"""download() against local file:// archives: extraction layout, checksums, URL overrides."""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
import pytest

from contrastkit.data import REGISTRY, SegmentationFolder, download

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("tqdm")


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kvasir_like_zip(tmp_path):
    return make_zip(
        tmp_path / "fixture.zip",
        {
            "Kvasir-SEG/images/p1.png": png_bytes(90),
            "Kvasir-SEG/images/p2.png": png_bytes(60),
            "Kvasir-SEG/masks/p1.png": png_bytes(255),
            "Kvasir-SEG/masks/p2.png": png_bytes(0),
            "Kvasir-SEG/kavsir_bboxes.json": b"{}",
            "__MACOSX/Kvasir-SEG/images/._p1.png": b"junk",
            "../evil/images/escape.png": png_bytes(1),
        },
    )


def test_extracts_into_images_and_masks(tmp_path):
    archive = kvasir_like_zip(tmp_path)
    root = tmp_path / "kvasir"
    with pytest.warns(UserWarning, match="not verified"):
        out = download("kvasir-seg", root, url=archive.as_uri(), progress=False)
    assert out == root
    assert sorted(p.name for p in (root / "images").iterdir()) == ["escape.png", "p1.png", "p2.png"]
    assert sorted(p.name for p in (root / "masks").iterdir()) == ["p1.png", "p2.png"]
    assert not (tmp_path / "evil").exists()  # member paths are flattened, never followed
    assert (root / "downloads" / "kvasir-seg.zip").read_bytes() == archive.read_bytes()
    ds = SegmentationFolder(root, ids=["p1", "p2"])
    assert ds[0][1].min() == 1 and ds[1][1].max() == 0


def test_checksum_verified_and_mismatch_deletes(tmp_path):
    archive = kvasir_like_zip(tmp_path)
    good = sha256(archive)
    download("kvasir-seg", tmp_path / "ok", url=archive.as_uri(), sha256=good, progress=False)
    assert (tmp_path / "ok" / "masks" / "p1.png").exists()
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        download("kvasir-seg", tmp_path / "bad", url=archive.as_uri(), sha256="0" * 64, progress=False)
    assert not (tmp_path / "bad" / "downloads" / "kvasir-seg.zip").exists()
    assert not (tmp_path / "bad" / "images").exists()


def test_reuses_archive_and_can_delete_it(tmp_path):
    archive = kvasir_like_zip(tmp_path)
    root = tmp_path / "k"
    download("kvasir-seg", root, url=archive.as_uri(), sha256=sha256(archive), progress=False)
    # A second call finds the archive and does not fetch: a bogus URL is never opened.
    download("kvasir-seg", root, url="file:///nonexistent/x.zip", sha256=sha256(archive), progress=False)
    download(
        "kvasir-seg",
        root,
        url="file:///nonexistent/x.zip",
        sha256=sha256(archive),
        keep_archives=False,
        progress=False,
    )
    assert not (root / "downloads" / "kvasir-seg.zip").exists()


def test_isic_two_archives_with_mask_suffix(tmp_path):
    images = make_zip(
        tmp_path / "in.zip",
        {
            "ISIC2018_Task1-2_Training_Input/ISIC_0000001.jpg": png_bytes(80),
            "ISIC2018_Task1-2_Training_Input/LICENSE.txt": b"cc",
        },
    )
    masks = make_zip(
        tmp_path / "gt.zip",
        {"ISIC2018_Task1_Training_GroundTruth/ISIC_0000001_segmentation.png": png_bytes(255)},
    )
    root = tmp_path / "isic"
    with pytest.warns(UserWarning):
        download("isic2018", root, url=[images.as_uri(), masks.as_uri()], progress=False)
    ds = SegmentationFolder(root, mask_suffix=REGISTRY["isic2018"].mask_suffix)
    assert ds.ids == ["ISIC_0000001"] and ds[0][1].min() == 1


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data set"):
        download("imagenet", tmp_path)
    with pytest.raises(ValueError, match="one entry per archive"):
        download("isic2018", tmp_path, url="file:///x.zip")
    not_zip = tmp_path / "n.zip"
    not_zip.write_bytes(b"plain text")
    with pytest.raises(ValueError, match="not a valid zip"):
        download("kvasir-seg", tmp_path / "r", url=not_zip.as_uri(), sha256=sha256(not_zip), progress=False)
    empty = make_zip(tmp_path / "e.zip", {"readme.txt": b"no images"})
    with pytest.raises(ValueError, match="no image files"):
        download("kvasir-seg", tmp_path / "r2", url=empty.as_uri(), sha256=sha256(empty), progress=False)


def test_registry_has_official_sources():
    assert REGISTRY["kvasir-seg"].archives[0].url.startswith("https://datasets.simula.no/")
    assert all(
        a.url.startswith("https://isic-challenge-data.s3.amazonaws.com/2018/")
        for a in REGISTRY["isic2018"].archives
    )
    for source in REGISTRY.values():
        for a in source.archives:
            assert a.sha256 is None or (len(a.sha256) == 64 and int(a.sha256, 16) >= 0)
