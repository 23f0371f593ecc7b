"""Image loading: 8/16-bit PNG, JPEG, DICOM (MONOCHROME1/2), colour, and errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_layouts import write_dicom
from PIL import Image

from unimed.data.errors import MISSING_IMAGE, UNREADABLE_IMAGE, DataError
from unimed.data.images import check_image, load_image

RAMP8 = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
RAMP16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)


def test_png_8_and_16_bit_scale_by_depth(tmp_path: Path) -> None:
    Image.fromarray(RAMP8).save(tmp_path / "a.png")
    Image.fromarray(RAMP16).save(tmp_path / "b.png")
    a, b = load_image(tmp_path / "a.png"), load_image(tmp_path / "b.png")
    assert a.dtype == np.float32 and a.shape == (8, 8)
    np.testing.assert_allclose(a, RAMP8 / 255.0, atol=1e-6)
    np.testing.assert_allclose(b, RAMP16 / 65535.0, atol=1e-6)


def test_jpeg_and_colour_become_grey_in_unit_range(tmp_path: Path) -> None:
    Image.fromarray(np.stack([RAMP8] * 3, axis=-1)).save(tmp_path / "c.jpg", quality=95)
    image = load_image(tmp_path / "c.jpg")
    assert image.shape == (8, 8) and 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_allclose(image, RAMP8 / 255.0, atol=0.05)


@pytest.mark.parametrize("array", [RAMP8, RAMP16])
def test_dicom_monochrome2_and_inverted_monochrome1(array: np.ndarray, tmp_path: Path) -> None:
    write_dicom(tmp_path / "m2.dcm", array)
    write_dicom(tmp_path / "m1.dcm", array, photometric="MONOCHROME1")
    scale = float(np.iinfo(array.dtype).max)
    np.testing.assert_allclose(load_image(tmp_path / "m2.dcm"), array / scale, atol=1e-6)
    np.testing.assert_allclose(load_image(tmp_path / "m1.dcm"), 1.0 - array / scale, atol=1e-6)


def test_missing_and_unreadable_images_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.png") as info:
        load_image(tmp_path / "nope.png")
    assert info.value.reason == MISSING_IMAGE
    for name in ("bad.png", "bad.jpg", "bad.dcm"):
        (tmp_path / name).write_bytes(b"\x00garbage")
        for reader in (load_image, check_image):
            with pytest.raises(DataError, match=name) as info:
                reader(tmp_path / name)
            assert info.value.reason == UNREADABLE_IMAGE


def test_truncated_png_is_unreadable(tmp_path: Path) -> None:
    Image.fromarray(RAMP16).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.png"):
        load_image(tmp_path / "t.png")


@pytest.mark.parametrize("name", ["t.jpg", "t.dcm", "t.png"])
def test_truncated_image_fails_the_image_check(name: str, tmp_path: Path) -> None:
    """Cut in half, a JPEG and a DICOM still have intact headers; the check decodes the pixels."""
    path = tmp_path / name
    array = (np.random.default_rng(0).random((120, 120)) * 255).astype(np.uint8)
    if name.endswith(".dcm"):
        write_dicom(path, array)
    else:
        Image.fromarray(array).save(path)
    check_image(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=name) as info:
        check_image(path)
    assert info.value.reason == UNREADABLE_IMAGE


def test_jpeg_draft_decodes_at_the_smallest_scale_covering_min_side(tmp_path: Path) -> None:
    y, x = np.mgrid[0:1200, 0:1000]
    smooth = (127 + 100 * np.sin(x / 90.0) * np.cos(y / 70.0)).astype(np.uint8)  # (1200, 1000)
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(smooth).save(tmp_path / "big.png")
    full = load_image(tmp_path / "big.jpg")
    assert full.shape == (1200, 1000)
    assert load_image(tmp_path / "big.jpg", min_side=200).shape == (300, 250)  # 1/4: 150 < 200
    assert load_image(tmp_path / "big.jpg", min_side=1000).shape == (1200, 1000)
    assert load_image(tmp_path / "big.png", min_side=200).shape == (1200, 1000)  # PNG: no draft
    small = load_image(tmp_path / "big.jpg", min_side=200)
    # The DCT-scaled decode is the full image averaged over 4 x 4 blocks, up to JPEG rounding.
    blocks = full.reshape(300, 4, 250, 4).mean(axis=(1, 3))
    assert np.abs(small - blocks).max() < 0.03
