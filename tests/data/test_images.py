"""Image loading: 8/16-bit PNG, JPEG, DICOM (MONOCHROME1/2), colour, and errors naming the file."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from data_layouts import write_dicom
from PIL import Image

from unimed.data.errors import MISSING_IMAGE, UNREADABLE_IMAGE, DataError
from unimed.data.images import MIN_IMAGE_SIDE, check_image, dicom_header, load_image

RAMP8 = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
RAMP16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)


def test_png_8_and_16_bit_scale_by_depth(tmp_path: Path) -> None:
    Image.fromarray(RAMP8).save(tmp_path / "a.png")
    Image.fromarray(RAMP16).save(tmp_path / "b.png")
    a, b = load_image(tmp_path / "a.png"), load_image(tmp_path / "b.png")
    assert a.dtype == np.float32 and a.shape == (8, 8)
    np.testing.assert_allclose(a, RAMP8 / 255.0, atol=1e-6)
    np.testing.assert_allclose(b, RAMP16 / 65535.0, atol=1e-6)



@pytest.mark.parametrize("bits", [12, 14, 16])
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_16_bit_file_reads_on_the_scale_of_the_bits_its_pixels_use(bits: int, suffix: str,
                                                                      tmp_path: Path) -> None:
    """DICOM converted to PNG / TIFF keeps 12- or 14-bit detector values in a 16-bit file: divided by
    65535 a 12-bit radiograph read 16 times darker (brightest pixel 0.06). Each reads on its bits'
    scale, so the same picture stored at 8, 12, 14 or 16 bits reads alike."""
    top = 2**bits - 1
    stored = np.rint(RAMP8 / 252.0 * top).astype(np.uint16)  # the ramp's brightest pixel is the top
    Image.fromarray(stored).save(tmp_path / f"stored{suffix}")
    image = load_image(tmp_path / f"stored{suffix}")
    np.testing.assert_allclose(image, stored / top, atol=1e-6)
    assert image.max() == 1.0
    np.testing.assert_allclose(image, RAMP8 / 252.0, atol=1e-3)

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


# A CR image as detectors store it: 12 of 16 bits, values in the part of the range bodies reach.
STORED12 = np.random.default_rng(12).integers(1200, 3100, (24, 20)).astype(np.uint16)


def _with_voi(path: Path, stored: np.ndarray = STORED12, photometric: str = "MONOCHROME2",
              **elements: object) -> Path:
    """A 12-bit DICOM of `stored` carrying the VOI LUT Module (and other) `elements` given."""
    import pydicom

    write_dicom(path, stored, photometric=photometric)
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = 12, 11
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), its output range taken as [0, 1]."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_window_shows_the_window_over_the_whole_unit_range(photometric: str, tmp_path: Path) -> None:
    """Scaled by its 12 bits alone this image would fill [0.29, 0.76]; its window makes it [0, 1]."""
    path = _with_voi(tmp_path / "w.dcm", photometric=photometric, WindowCenter=2150, WindowWidth=1300)
    expected = _linear_window(STORED12.astype(np.float64), 2150, 1300)
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    image = load_image(path)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert image.min() == 0.0 and image.max() == 1.0


def test_dicom_window_follows_the_rescale_and_takes_the_first_of_several(tmp_path: Path) -> None:
    """The modality rescale comes before the window; of two windows the first is the default."""
    path = _with_voi(tmp_path / "r.dcm", RescaleSlope=2, RescaleIntercept=-1000,
                     WindowCenter=[3300, 100], WindowWidth=[2000, 50])
    expected = _linear_window(STORED12 * 2.0 - 1000.0, 3300, 2000)
    np.testing.assert_allclose(load_image(path), expected, atol=1e-6)


def test_dicom_sigmoid_window(tmp_path: Path) -> None:
    path = _with_voi(tmp_path / "s.dcm", WindowCenter=2000, WindowWidth=800, VOILUTFunction="SIGMOID")
    expected = 1.0 / (1.0 + np.exp(-4.0 * (STORED12 - 2000.0) / 800.0))  # PS3.3 C.11.2.1.3.1
    np.testing.assert_allclose(load_image(path), expected, atol=1e-5)


def test_dicom_voi_lut_is_preferred_and_scaled_by_its_own_entries(tmp_path: Path) -> None:
    """A LUT declaring 16-bit entries that hold 100..3000 (as many CR LUTs do): its entries, not
    the declared depth, are the range; it wins over a window given beside it."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    first, entries = 1500, 1024
    table = np.round(100 + 2900 * np.linspace(0.0, 1.0, entries) ** 0.7).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [entries, first, 16]
    item.LUTData = table.astype("<u2").tobytes()
    path = _with_voi(tmp_path / "l.dcm", VOILUTSequence=Sequence([item]), WindowCenter=2150, WindowWidth=1300)
    expected = (table[np.clip(STORED12.astype(np.int64) - first, 0, entries - 1)] - 100.0) / 2900.0
    np.testing.assert_allclose(load_image(path), expected, atol=1e-6)


def test_dicom_invalid_window_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = _with_voi(tmp_path / "bad-window.dcm", WindowCenter=2000, WindowWidth=0)
    with pytest.raises(DataError) as info:
        load_image(path)
    assert info.value.reason == UNREADABLE_IMAGE and "\n" not in str(info.value)
    assert str(info.value).startswith(f"{path}: cannot read image (") and "Window Width" in str(info.value)


def _compressed(source: Path, target: Path, syntax: str) -> None:
    """`source` re-encoded with the transfer syntax `syntax` (a gdcm.TransferSyntax name), by GDCM."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()


@pytest.mark.parametrize("syntax, uid", [
    ("JPEGLosslessProcess14_1", "1.2.840.10008.1.2.4.70"),  # what CR / DX images are mostly stored as
    ("JPEGLSLossless", "1.2.840.10008.1.2.4.80"),
    ("JPEG2000Lossless", "1.2.840.10008.1.2.4.90"),
    ("RLELossless", "1.2.840.10008.1.2.5"),
])
@pytest.mark.parametrize("bits", [8, 16])
def test_compressed_dicom_decodes_to_the_uncompressed_pixels(syntax: str, uid: str, bits: int,
                                                             tmp_path: Path) -> None:
    import pydicom

    rng = np.random.default_rng(bits)
    array = rng.integers(0, 2**bits, (48, 40), dtype=np.uint8 if bits == 8 else np.uint16)
    write_dicom(tmp_path / "plain.dcm", array)
    _compressed(tmp_path / "plain.dcm", tmp_path / "packed.dcm", syntax)
    assert pydicom.dcmread(tmp_path / "packed.dcm").file_meta.TransferSyntaxUID == uid
    np.testing.assert_array_equal(load_image(tmp_path / "packed.dcm"), load_image(tmp_path / "plain.dcm"))


def test_a_dicom_no_installed_decoder_reads_is_one_line_naming_it(tmp_path: Path) -> None:
    """12-bit JPEG Extended (pydicom's own test file): only a GPL decoder reads it, not installed;
    pydicom's message lists each plugin on a line of its own, the error keeps it to one."""
    import shutil

    import pydicom

    sample = Path(pydicom.__file__).parent / "data" / "test_files" / "JPGExtended.dcm"
    shutil.copyfile(sample, tmp_path / "extended.dcm")
    with pytest.raises(DataError) as info:
        load_image(tmp_path / "extended.dcm")
    message = str(info.value)
    assert "\n" not in message and info.value.reason == UNREADABLE_IMAGE
    assert message.startswith(f"{tmp_path / 'extended.dcm'}: cannot read image (")
    assert "gdcm: GDCM does not support 'JPEG Extended' for samples with 12-bit precision; pillow:" in message


def test_missing_and_unreadable_images_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.png") as info:
        load_image(tmp_path / "nope.png")
    assert info.value.reason == MISSING_IMAGE
    (tmp_path / "scans.png").mkdir()
    for reader in (load_image, check_image):
        with pytest.raises(DataError, match=r"scans\.png: a folder, not an image file$") as info:
            reader(tmp_path / "scans.png")
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


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (2, 40), (40, MIN_IMAGE_SIDE - 1)])
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".dcm"])
def test_an_image_of_a_few_pixels_is_named_not_scored(shape: tuple[int, int], suffix: str,
                                                      tmp_path: Path) -> None:
    """A placeholder of a few pixels decodes, and resized it would be a flat image scored like any
    other: it is a DataError naming the file and its size, whichever reader meets it."""
    path = tmp_path / f"tiny{suffix}"
    array = np.full(shape, 128, dtype=np.uint8)
    write_dicom(path, array) if suffix == ".dcm" else Image.fromarray(array).save(path)
    size = rf"{shape[1]} x {shape[0]} pixels: too small for a radiograph"
    for read in (load_image, check_image, lambda p: load_image(p, min_side=96)):
        with pytest.raises(DataError, match=rf"tiny\{suffix}: the image is {size}") as info:
            read(path)
        assert info.value.reason == UNREADABLE_IMAGE


def test_the_smallest_side_read_is_the_stored_one_not_the_jpeg_draft(tmp_path: Path) -> None:
    """A 16-px JPEG decodes at 1/8 (2 x 2 pixels) in the image check and passes: the rule reads
    the stored size."""
    Image.fromarray(np.full((16, 16), 90, dtype=np.uint8)).save(tmp_path / "small.jpg")
    Image.fromarray(np.full((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE), 90, dtype=np.uint8)).save(tmp_path / "edge.png")
    check_image(tmp_path / "small.jpg")
    assert load_image(tmp_path / "small.jpg", min_side=1).shape == (2, 2)
    assert load_image(tmp_path / "edge.png").shape == (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)


def test_an_image_over_pillows_pixel_limit_is_named_and_one_below_it_read_without_a_warning(
        tmp_path: Path, monkeypatch) -> None:
    """Pillow refuses an image of more than twice MAX_IMAGE_PIXELS (a decompression bomb) with its
    own exception, which was a traceback even under on_error=skip; above the limit alone it
    printed a bare DecompressionBombWarning."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.fromarray(np.full((12, 12), 70, dtype=np.uint8)).save(tmp_path / "large.png")  # 144 px
    Image.fromarray(np.full((16, 16), 70, dtype=np.uint8)).save(tmp_path / "huge.png")  # 256 > 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / "large.png").shape == (12, 12)
    for read in (load_image, check_image):
        with pytest.raises(DataError, match=r"huge\.png: cannot read image \(Image size \(256 pixels\) "
                                            r"exceeds limit of 200 pixels") as info:
            read(tmp_path / "huge.png")
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


def test_float_and_32_bit_tiffs_read_their_values_or_name_the_span(tmp_path: Path) -> None:
    ramp = (RAMP8 / 255.0).astype(np.float32)
    Image.fromarray(ramp).save(tmp_path / "float.tif")
    Image.fromarray(RAMP16.astype(np.int32)).save(tmp_path / "int32.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    assert Image.open(tmp_path / "int32.tif").mode == "I"
    np.testing.assert_allclose(load_image(tmp_path / "float.tif"), ramp, atol=1e-7)
    np.testing.assert_allclose(load_image(tmp_path / "int32.tif"), RAMP16 / 65535.0, atol=1e-6)
    for name, array, span in [("hu.tif", ramp * 2000 - 1000, "span -1000 .. 976.471"),
                              ("nan.tif", np.where(ramp > 0.5, np.nan, ramp).astype(np.float32),
                               "include NaN"),
                              ("wide.tif", RAMP16.astype(np.int32) * 4, "span 0 .. 252000")]:
        Image.fromarray(array).save(tmp_path / name)
        with pytest.raises(DataError, match="pixels must lie in 0 .. ") as err:
            load_image(tmp_path / name)
        assert err.value.reason == UNREADABLE_IMAGE and name in str(err.value) and span in str(err.value)


def test_colour_dicom_becomes_the_grey_a_colour_png_does(tmp_path: Path) -> None:
    """A secondary capture stored as RGB reads as Pillow reads the same pixels from a PNG (luma,
    which Pillow rounds to 8 bits), not as an error."""
    rgb = np.random.default_rng(3).integers(0, 256, (12, 10, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB")
    np.testing.assert_allclose(load_image(tmp_path / "c.dcm"), load_image(tmp_path / "c.png"), atol=0.5 / 255)


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_dicom_without_preamble_and_file_meta_reads_as_with_them(implicit_vr: bool, tmp_path: Path) -> None:
    """A data set written without the Part 10 preamble, 'DICM' prefix and file meta (older archives):
    its pixels and header, read in the encoding it was written in."""
    write_dicom(tmp_path / "full.dcm", RAMP16)
    bare = pydicom.dcmread(tmp_path / "full.dcm")
    del bare.file_meta
    bare.preamble = None
    bare.save_as(tmp_path / "bare.dcm", implicit_vr=implicit_vr, little_endian=True)
    assert not (tmp_path / "bare.dcm").read_bytes()[128:132] == b"DICM"
    np.testing.assert_array_equal(load_image(tmp_path / "bare.dcm"), load_image(tmp_path / "full.dcm"))
    assert dicom_header(tmp_path / "bare.dcm").Rows == RAMP16.shape[0]


def test_multi_frame_and_non_dicom_files_are_named_as_such(tmp_path: Path) -> None:
    write_dicom(tmp_path / "frames.dcm", np.stack([RAMP8, RAMP8]))
    ds = pydicom.dcmread(tmp_path / "frames.dcm")
    ds.NumberOfFrames = 2
    ds.save_as(tmp_path / "frames.dcm")
    with pytest.raises(DataError, match=r"frames.dcm: a multi-frame DICOM \(2 frames\): an X-ray record is "):
        load_image(tmp_path / "frames.dcm")
    Image.fromarray(RAMP8).save(tmp_path / "renamed.dcm", format="PNG")
    for reader, what in ((load_image, "image"), (dicom_header, "DICOM header")):
        expected = rf"renamed.dcm: cannot read {what} \(not DICOM: no 'DICM' prefix, nor an image data set"
        with pytest.raises(DataError, match=expected + r" without one\)$"):
            reader(tmp_path / "renamed.dcm")


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_a_picture_stored_turned_is_read_upright_as_its_exif_orientation_says(tmp_path: Path,
                                                                               suffix: str) -> None:
    """EXIF orientation 6 (stored turned a quarter to the left: viewers turn it back) was ignored:
    a 128-wide, 256-tall radiograph photographed by a phone was read 256 wide, sideways."""
    upright = np.zeros((256, 128), dtype=np.uint8)
    upright[:32] = 255  # a bright band at the top
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # as the phone stored it
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"photo{suffix}"
    stored.save(path, exif=exif.tobytes(), **({"quality": 95} if suffix == ".jpg" else {}))
    pixels = load_image(path)
    assert pixels.shape == (256, 128)
    assert pixels[:32].mean() > 0.9 and pixels[64:].mean() < 0.1  # the band is at the top again
    plain = tmp_path / f"plain{suffix}"
    Image.fromarray(upright).save(plain)
    assert load_image(plain).shape == (256, 128)  # no orientation tag: read as stored
    if suffix == ".jpg":
        assert load_image(path, min_side=64).shape == (128, 64)  # the reduced decode, turned too
