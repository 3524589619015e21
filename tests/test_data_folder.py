"""SegmentationFolder on tiny generated folders, and on the real Kvasir-SEG when it is there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from contrastkit.data import MASK_THRESHOLD, SegmentationFolder, make_split, shared_data_root

Image = pytest.importorskip("PIL.Image")


def write_pair(root, stem, image, mask, image_ext=".png", mask_ext=".png", mask_suffix=""):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{stem}{image_ext}")
    Image.fromarray(mask).save(root / "masks" / f"{stem}{mask_suffix}{mask_ext}")


def pattern(h, w, offset):
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(yy * 7 + offset) % 256, (xx * 5 + offset) % 256, (yy + xx + offset) % 256], -1)
    return rgb.astype(np.uint8)


def test_pairs_by_stem_and_values(tmp_path):
    masks = {}
    for k, stem in enumerate(["b", "a", "c"]):
        mask = np.zeros((6, 8), np.uint8)
        mask[k : k + 3, 2:5] = 255
        masks[stem] = mask
        write_pair(tmp_path, stem, pattern(6, 8, 10 * k), mask)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    ds = SegmentationFolder(tmp_path)
    assert ds.ids == ["a", "b", "c"]
    for i, stem in enumerate(ds.ids):
        image, mask = ds[i]
        k = ["b", "a", "c"].index(stem)
        assert image.dtype == torch.float32 and image.shape == (3, 6, 8)
        assert mask.dtype == torch.float32 and mask.shape == (1, 6, 8)
        expected = torch.from_numpy(pattern(6, 8, 10 * k)).permute(2, 0, 1).double() / 255
        torch.testing.assert_close(image.double(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(mask[0], torch.from_numpy(masks[stem] > 0).float())


def test_subset_keeps_given_order_and_rejects_unknown(tmp_path):
    for stem in ["x1", "x2", "x3"]:
        write_pair(tmp_path, stem, pattern(4, 4, 0), np.zeros((4, 4), np.uint8))
    assert SegmentationFolder(tmp_path, ids=["x3", "x1"]).ids == ["x3", "x1"]
    with pytest.raises(ValueError, match="no image"):
        SegmentationFolder(tmp_path, ids=["x1", "nope"])


def test_jpeg_mask_threshold(tmp_path):
    grey = np.array([[0, 100, 127, 128], [129, 200, 255, 50]], np.uint8).repeat(4, 0).repeat(4, 1)
    write_pair(tmp_path, "g", pattern(8, 16, 0), grey)  # PNG: grey values stored exactly
    _, mask = SegmentationFolder(tmp_path)[0]
    torch.testing.assert_close(mask[0], torch.from_numpy(grey > MASK_THRESHOLD).float())
    _, mask_hi = SegmentationFolder(tmp_path, threshold=199)[0]
    torch.testing.assert_close(mask_hi[0], torch.from_numpy(grey > 199).float())


def test_noisy_jpeg_mask_becomes_binary(tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 10:26] = 255
    write_pair(tmp_path, "j", pattern(32, 32, 3), np.stack([mask] * 3, -1), ".jpg", ".jpg")
    _, loaded = SegmentationFolder(tmp_path)[0]
    assert set(loaded.unique().tolist()) <= {0.0, 1.0}
    # JPEG ringing moves only a few edge pixels across the threshold.
    assert (loaded[0] != torch.from_numpy(mask > 127).float()).float().mean() < 0.02


FOREGROUND = np.zeros((6, 8), bool)
FOREGROUND[1:4, 2:7] = True
FOREGROUND[5, 0] = True


def _palette_mask(indices, colours):
    mask = Image.fromarray(indices.astype(np.uint8), mode="L").convert("P")
    mask.putpalette([c for colour in colours for c in colour])
    return mask


def _rgba(rgb):
    return Image.fromarray(np.dstack([rgb, np.full(FOREGROUND.shape, 255, np.uint8)]), mode="RGBA")


# Each mask encodes FOREGROUND; the readers must give it back pixel for pixel, whatever the encoding.
MASK_ENCODINGS = {
    "L 0/255": lambda fg: Image.fromarray(fg.astype(np.uint8) * 255),
    "L 0/1": lambda fg: Image.fromarray(fg.astype(np.uint8)),
    "1 bilevel": lambda fg: Image.fromarray(fg),
    "LA 0/255": lambda fg: Image.fromarray(fg.astype(np.uint8) * 255).convert("LA"),
    "I;16 0/1": lambda fg: Image.fromarray(fg.astype(np.uint16)),
    "I;16 0/255": lambda fg: Image.fromarray(fg.astype(np.uint16) * 255),
    "I;16 0/65535": lambda fg: Image.fromarray(fg.astype(np.uint16) * 65535),
    "RGB pure red": lambda fg: Image.fromarray(np.dstack([fg * 255, fg * 0, fg * 0]).astype(np.uint8)),
    "RGB pure blue": lambda fg: Image.fromarray(np.dstack([fg * 0, fg * 0, fg * 255]).astype(np.uint8)),
    "RGBA red": lambda fg: _rgba(np.dstack([fg * 255, fg * 0, fg * 0]).astype(np.uint8)),
    "P black/red": lambda fg: _palette_mask(fg, [(0, 0, 0), (255, 0, 0)]),
    "P grey ramp 0/1": lambda fg: Image.fromarray(fg.astype(np.uint8)).convert("P"),
    "P white/black": lambda fg: _palette_mask(~fg, [(255, 255, 255), (0, 0, 0)]),  # index 0 is the foreground
}


@pytest.mark.parametrize("encoding", MASK_ENCODINGS)
def test_mask_encodings_read_exactly(tmp_path, encoding):
    mask = MASK_ENCODINGS[encoding](FOREGROUND)
    write_pair(tmp_path, "e", pattern(6, 8, 0), np.zeros((6, 8), np.uint8))
    mask.save(tmp_path / "masks" / "e.png")
    assert Image.open(tmp_path / "masks" / "e.png").mode == encoding.split()[0]  # stored as named, not converted
    ds = SegmentationFolder(tmp_path)
    np.testing.assert_array_equal(ds.load(0)[1], FOREGROUND.astype(np.uint8))
    torch.testing.assert_close(ds[0][1][0], torch.from_numpy(FOREGROUND).float(), rtol=0, atol=0)


def test_sixteen_bit_masks_follow_the_threshold_on_their_own_scale(tmp_path):
    values = np.array([[0, 255, 32639, 32640, 40000, 65535]], np.uint16).repeat(2, 0)
    write_pair(tmp_path, "w", pattern(2, 6, 0), np.zeros((2, 6), np.uint8))
    Image.fromarray(values).save(tmp_path / "masks" / "w.png")
    np.testing.assert_array_equal(SegmentationFolder(tmp_path).load(0)[1], (values > 127 * 257).astype(np.uint8))
    np.testing.assert_array_equal(SegmentationFolder(tmp_path, threshold=0).load(0)[1], (values > 0).astype(np.uint8))


def _refused(tmp_path, mask, name="bad.png"):
    write_pair(tmp_path, "ok", pattern(4, 4, 0), np.full((4, 4), 255, np.uint8))
    Image.fromarray(pattern(4, 4, 1)).save(tmp_path / "images" / f"{Path(name).stem}.png")
    mask.save(tmp_path / "masks" / name)
    ds = SegmentationFolder(tmp_path)
    assert ds.load(ds.ids.index("ok"))[1].all()
    return ds, ds.ids.index(Path(name).stem)


@pytest.mark.parametrize("values, reach", [([0, 1, 2], 2), ([0, 60, 127], 127)])
def test_masks_with_marks_but_no_foreground_are_refused_by_name(tmp_path, values, reach):
    """A label map 0/1/2, or a faint mask nowhere above the threshold: reading it as empty would drop the lesion."""
    grey = np.resize(np.array(values, np.uint8), (4, 4))
    ds, index = _refused(tmp_path, Image.fromarray(grey))
    with pytest.raises(ValueError, match=rf"bad\.png: values reach {reach} but none exceeds the threshold 127"):
        ds[index]


def test_encodings_the_rule_cannot_read_are_refused_by_name(tmp_path):
    indices = np.array([[0, 1], [1, 0]], np.uint8).repeat(2, 0).repeat(2, 1)
    no_colour = Image.fromarray(indices).convert("P")
    no_colour.putpalette([0, 0, 0])  # index 1 has no colour: PIL would show it black
    ds, index = _refused(tmp_path / "palette", no_colour)
    with pytest.raises(ValueError, match=r"bad\.png: pixels use palette index 1 but the palette has 1 colours"):
        ds[index]
    ds, index = _refused(tmp_path / "cmyk", Image.new("CMYK", (4, 4)), "bad.tif")
    with pytest.raises(ValueError, match=r"bad\.tif: PIL mode 'CMYK' is not a mask encoding; expected grey"):
        ds[index]
    ds, index = _refused(tmp_path / "float", Image.fromarray(np.ones((4, 4), np.float32)), "bad.tif")
    with pytest.raises(ValueError, match=r"bad\.tif: PIL mode 'F' is not a mask encoding"):
        ds[index]
    ds, index = _refused(tmp_path / "wide", Image.fromarray(np.full((4, 4), 70000, np.int32)), "bad.tif")
    with pytest.raises(ValueError, match=r"bad\.tif: expected values in 0\.\.65535; got 70000\.\.70000"):
        ds[index]


def test_hidden_and_macos_junk_files_are_skipped(tmp_path):
    write_pair(tmp_path, "a", pattern(4, 4, 0), np.full((4, 4), 255, np.uint8))
    for folder in ("images", "masks"):
        (tmp_path / folder / "._a.png").write_bytes(b"\0\5\26\7 Mac OS X AppleDouble metadata")
        (tmp_path / folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    Image.fromarray(pattern(4, 4, 1)).save(tmp_path / "images" / ".thumbnail.png")  # a real image, but hidden
    ds = SegmentationFolder(tmp_path)
    assert ds.ids == ["a"] and ds.mask_paths == [tmp_path / "masks" / "a.png"]
    with pytest.raises(ValueError, match="no image"):
        SegmentationFolder(tmp_path, ids=["._a"])


def test_resize_bilinear_image_nearest_mask(tmp_path):
    image = pattern(20, 30, 0)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 6:24] = 255
    write_pair(tmp_path, "r", image, mask)
    img_t, mask_t = SegmentationFolder(tmp_path, size=(10, 15))[0]
    assert img_t.shape == (3, 10, 15) and mask_t.shape == (1, 10, 15)
    expected_img = np.array(Image.fromarray(image).resize((15, 10), Image.Resampling.BILINEAR))
    torch.testing.assert_close(img_t, torch.from_numpy(expected_img).permute(2, 0, 1).float() / 255)
    expected_mask = np.array(Image.fromarray((mask > 127).astype(np.uint8)).resize((15, 10), Image.NEAREST))
    torch.testing.assert_close(mask_t[0], torch.from_numpy(expected_mask).float())
    assert SegmentationFolder(tmp_path, size=12)[0][0].shape == (3, 12, 12)


def test_mask_suffix_isic_style(tmp_path):
    write_pair(
        tmp_path,
        "ISIC_0000001",
        pattern(4, 4, 0),
        np.full((4, 4), 255, np.uint8),
        ".jpg",
        ".png",
        mask_suffix="_segmentation",
    )
    with pytest.raises(FileNotFoundError, match="ISIC_0000001"):
        SegmentationFolder(tmp_path)
    ds = SegmentationFolder(tmp_path, mask_suffix="_segmentation")
    assert ds.ids == ["ISIC_0000001"] and ds[0][1].min() == 1


def test_missing_mask_names_the_file(tmp_path):
    write_pair(tmp_path, "ok", pattern(4, 4, 0), np.zeros((4, 4), np.uint8))
    Image.fromarray(pattern(4, 4, 1)).save(tmp_path / "images" / "lonely.png")
    with pytest.raises(FileNotFoundError, match=r"lonely\.png"):
        SegmentationFolder(tmp_path)


def test_unreadable_file_names_the_file(tmp_path):
    write_pair(tmp_path, "ok", pattern(4, 4, 0), np.zeros((4, 4), np.uint8))
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "masks" / "broken.png")
    ds = SegmentationFolder(tmp_path)
    with pytest.raises(OSError, match=r"broken\.jpg"):
        ds[ds.ids.index("broken")]


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        SegmentationFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SegmentationFolder(tmp_path / "elsewhere")


def test_size_mismatch_and_bad_arguments(tmp_path):
    write_pair(tmp_path, "m", pattern(4, 4, 0), np.zeros((5, 4), np.uint8))
    with pytest.raises(ValueError, match="mask"):
        SegmentationFolder(tmp_path)[0]
    with pytest.raises(ValueError, match="size"):
        SegmentationFolder(tmp_path, size=0)
    with pytest.raises(TypeError, match="size"):
        SegmentationFolder(tmp_path, size=(4, 4, 4))
    with pytest.raises(ValueError, match="threshold"):
        SegmentationFolder(tmp_path, threshold=300)


def _kvasir():
    root = shared_data_root()
    if root is None or not (root / "kvasir-seg" / "images").is_dir():
        pytest.skip("real Kvasir-SEG not found: set CONTRASTKIT_DATA or put it in <repo root>/../shared/data")
    return root / "kvasir-seg"


def test_real_kvasir_seg():
    ds = SegmentationFolder(_kvasir())
    assert len(ds) == 998
    assert all(m.stem == i for i, m in zip(ds.ids, ds.mask_paths, strict=True))
    fractions = []
    for index in range(0, 998, 100):
        image, mask = ds[index]
        assert image.shape == (3, 256, 256) and mask.shape == (1, 256, 256)
        assert 0 <= image.min() and image.max() <= 1
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        fractions.append(mask.mean().item())
    assert all(0 < f < 1 for f in fractions)  # every Kvasir-SEG image holds a polyp
    split = make_split(ds.ids, seed=0, val=0.1, test=0.1, labeled=0.1)
    sizes = (len(split.test), len(split.val), len(split.train), len(split.train_labeled))
    assert sizes == (100, 100, 798, 80)
    small = SegmentationFolder(_kvasir(), size=128, ids=split.val[:2])
    assert small[1][0].shape == (3, 128, 128)


def test_shared_data_root_env(tmp_path, monkeypatch):
    monkeypatch.delenv("CONTRASTKIT_DATA", raising=False)
    assert shared_data_root() is None  # the library never guesses a location
    monkeypatch.setenv("CONTRASTKIT_DATA", str(tmp_path))
    assert shared_data_root() == tmp_path
    monkeypatch.setenv("CONTRASTKIT_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="CONTRASTKIT_DATA.*pass the folder explicitly"):
        shared_data_root()
