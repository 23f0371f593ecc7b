"""Reading chest images (JPEG, 8/16-bit PNG, TIFF, DICOM) as float32 grey arrays in [0, 1]."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from unimed.data.errors import MISSING_IMAGE, UNREADABLE_IMAGE, DataError

DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})
# Pillow modes of single-channel images and the value that maps to 1.0: 8- and 16-bit grey, 32-bit
# integers ("I", in which Pillow reads some 16-bit greyscale files, so read as 16-bit) and 32-bit
# floats ("F", taken as they are: converted to 8-bit grey they would be rounded to 0 and 1).
_GREY_MAX: dict[str, float] = {"L": 255.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0,
                               "I": 65535.0, "F": 1.0}
# The bit depths a 16-bit file's pixels are read at: the smallest that holds its brightest pixel.
# DICOM converted to PNG / TIFF keeps the detector's 12- or 14-bit values in a 16-bit file (no PNG
# reader exposes its sBIT chunk), and divided by 65535 such an image reads 16 (or 4) times darker:
# nearly black, which the encoders would embed without a word.
STORED_BITS: tuple[int, ...] = (12, 14, 16)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I"})
# ITU-R 601-2 luma, the weights of Pillow's colour-to-"L" conversion.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# The modes whose pixels can lie outside that range.
_WIDE_MODES: dict[str, str] = {"I": "32-bit integer", "F": "floating-point"}
# What Pillow and pydicom raise on a truncated, corrupt or unsupported file (pydicom raises
# RuntimeError / NotImplementedError for compressed pixel data without a decoder plugin, and
# AttributeError when PixelData is absent).
_READ_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    RuntimeError,
    NotImplementedError,
    AttributeError,
    InvalidDicomError,
    Image.DecompressionBombError,  # over twice Pillow's MAX_IMAGE_PIXELS: not decoded
)


def is_dicom(path: str | Path) -> bool:
    """Whether `path` is read as DICOM: by its suffix (.dcm, .dicom), or, for a name without the
    suffix of a format Pillow reads (DICOM files are often named by their instance UID,
    "1.2.840.113619....", or "IM0001"), by the 'DICM' prefix after the 128-byte preamble."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in Image.registered_extensions():
        return False
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def load_image(path: str | Path, min_side: int | None = None) -> np.ndarray:
    """Read an image as float32 (H, W) in [0, 1]; raises DataError naming the file when it cannot.

    DICOM is shown as its VOI LUT or window says (MONOCHROME1 inverted so bright is dense), or
    scaled by its stored bit depth where it has neither; PNG/JPEG/TIFF by their bit depth (a 16-bit
    file by the 12, 14 or 16 bits its pixels use, `stored_range`; float
    TIFFs as they are, when in [0, 1]; pixels outside their range are a DataError, not clipped);
    colour images are converted to grey. With `min_side`, a JPEG is decoded at the smallest of its DCT scales
    (1/2, 1/4, 1/8) whose sides stay >= `min_side` (Pillow's ``draft``: several times faster for a
    3000-px radiograph that is resized to 256 px anyway); other formats are read at full size.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(not_an_image_file(path), path, reason=MISSING_IMAGE)
    try:
        image = _load_dicom(path) if is_dicom(path) else _load_pil(path, min_side)
    except DataError:
        raise
    except _READ_ERRORS as err:
        raise DataError(f"cannot read image ({err})", path, reason=UNREADABLE_IMAGE) from None
    if image.ndim != 2:
        raise DataError(
            f"expected a 2-D image, got shape {image.shape}", path, reason=UNREADABLE_IMAGE
        )
    return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)


def not_an_image_file(path: Path) -> str:
    """Why `path`, which is not a file, gives no image: a folder there (a study's folder given for
    its image), or nothing."""
    return "a folder, not an image file" if path.is_dir() else "image file not found"


def stored_range(brightest: float) -> float:
    """The value that maps to 1.0 in a 16-bit image whose brightest pixel is `brightest`: 4095,
    16383 or 65535, the top of the smallest of `STORED_BITS` that holds it."""
    bits = next((b for b in STORED_BITS if brightest < 2**b), STORED_BITS[-1])
    return float(2**bits - 1)


def pil_grey(im: Image.Image) -> np.ndarray:
    """A PIL image as float32 grey (H, W) scaled by its mode's range (colour and palette images
    converted to 8-bit grey first); a 16-bit image by the range of its stored bits (`stored_range`).
    Pixels of the 32-bit modes can come out of [0, 1], or NaN: they are neither clipped nor rescaled
    here, for the caller to refuse."""
    if im.mode not in _GREY_MAX:
        im = im.convert("L")
    image = np.asarray(im, dtype=np.float32)
    if im.mode in _SIXTEEN_BIT_MODES:
        return image / stored_range(float(image.max(initial=0)))
    return image / _GREY_MAX[im.mode]


MIN_IMAGE_SIDE = 8
"""The shortest side, in stored pixels, of an image read as a radiograph. The smallest chest images
in use are MedMNIST's 28 x 28; a file of a few pixels is a placeholder or a broken export, which
resizing would turn into a flat image, embedded and scored like any other."""


def check_side(height: int, width: int, path: Path) -> None:
    """A DataError naming `path` when its stored image is smaller than `MIN_IMAGE_SIDE` a side."""
    if min(height, width) < MIN_IMAGE_SIDE:
        raise DataError(f"the image is {width} x {height} pixels: too small for a radiograph (at least "
                        f"{MIN_IMAGE_SIDE} a side; a placeholder or a broken export?)", path,
                        reason=UNREADABLE_IMAGE)


EXIF_ORIENTATION = 0x0112
"""The EXIF tag saying how a camera or a phone held the picture: 1 upright, 2-8 mirrored or
turned, which viewers (and Pillow's ``ImageOps.exif_transpose``) undo."""


def _load_pil(path: Path, min_side: int | None = None) -> np.ndarray:
    """The grey pixels of a PIL-readable file, upright: a JPEG or PNG whose EXIF orientation says it
    was stored turned (a photograph of a film, a scan from a phone) is turned back, as a viewer
    shows it (it was read as stored, sideways)."""
    with warnings.catch_warnings():  # an image over MAX_IMAGE_PIXELS (but not twice it) is read
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = Image.open(path)
    with opened as im:
        check_side(im.height, im.width, path)  # the stored size: a JPEG's draft decodes it smaller
        if min_side is not None and im.format == "JPEG":
            im.draft("L", (min_side, min_side))
        if "exif" in im.info and im.getexif().get(EXIF_ORIENTATION, 1) != 1:  # info: no decode
            im = ImageOps.exif_transpose(im)
        if im.mode in _WIDE_MODES:
            _check_wide(np.asarray(im, dtype=np.float32), im.mode, path)
        return pil_grey(im)


def _check_wide(pixels: np.ndarray, mode: str, path: Path) -> None:
    """A DataError naming `path` when pixels of a 32-bit mode lie outside 0 .. its top (or are NaN)."""
    top = _GREY_MAX[mode]
    if pixels.size and not (0.0 <= pixels.min() and pixels.max() <= top):  # NaN fails too
        these = "include NaN" if np.isnan(pixels).any() else f"span {pixels.min():g} .. {pixels.max():g}"
        raise DataError(f"{_WIDE_MODES[mode]} pixels must lie in 0 .. {top:g}, these {these} (store "
                        "the image as 8- or 16-bit grey, or as floats in [0, 1])", path,
                        reason=UNREADABLE_IMAGE)


def _dcmread(path: Path, **kwargs) -> pydicom.Dataset:
    """`path` read by pydicom; a file without the 128-byte preamble and file meta header (written
    before DICOM Part 10, or by tools that leave them out) is read as a bare data set, its transfer
    syntax the encoding pydicom found it in (an uncompressed one: such files cannot say another)."""
    try:
        return pydicom.dcmread(path, **kwargs)
    except InvalidDicomError:
        not_dicom = InvalidDicomError("not DICOM: no 'DICM' prefix, nor an image data set without one")
    try:
        with warnings.catch_warnings():  # forced reads of other files warn of the VR they guess
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, **kwargs)
    except _READ_ERRORS:
        raise not_dicom from None
    if "Rows" not in ds:  # every image data set has it: any other file read by force lacks it
        raise not_dicom
    implicit, little = ds.original_encoding
    if "TransferSyntaxUID" not in ds.file_meta and implicit is not None:
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _load_dicom(path: Path) -> np.ndarray:
    """Compressed pixel data decodes through pydicom's plugins: Pillow (JPEG baseline, JPEG 2000),
    GDCM (also JPEG lossless, the usual compression of CR / DX images, and JPEG-LS), pydicom's own
    RLE. 12-bit JPEG Extended is left unread (only a GPL decoder reads it): a DataError. A colour
    image (RGB, or YBR that pydicom converts to RGB; secondary captures) becomes grey by the luma
    weights Pillow's conversion of a colour PNG uses; a multi-frame file is a DataError."""
    ds = _dcmread(path)
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DataError(f"a multi-frame DICOM ({frames} frames): an X-ray record is one image (a CT "
                        "series is a volume: the `volume` column)", path, reason=UNREADABLE_IMAGE)
    stored = ds.pixel_array  # (H, W), or (H, W, 3) RGB
    check_side(stored.shape[0], stored.shape[1], path)
    if int(ds.get("SamplesPerPixel") or 1) == 3:
        bits = int(getattr(ds, "BitsStored", 8 * stored.itemsize))
        return stored.astype(np.float32) @ _LUMA / float(2**bits - 1)
    image = _shown(stored, ds)
    if image is None and int(getattr(ds, "PixelRepresentation", 0)) == 0:
        bits = int(getattr(ds, "BitsStored", 8 * stored.itemsize))
        image = stored.astype(np.float32) / float(2**bits - 1)
    elif image is None:
        # Signed data (rare for radiographs) has no fixed range, so it is min-max scaled.
        image = _unit_range(stored.astype(np.float32), float(stored.min()), float(stored.max()))
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        image = 1.0 - image
    return image


def _shown(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """The image as its VOI LUT Module says to show it (PS3.3 C.11.2), in [0, 1]; None without one.

    CR / DX images store 10-16 bit detector values of which the window or LUT picks the part worth
    seeing (MIMIC-CXR-JPG was made this way): scaled by bit depth alone, such an image fills a
    third of [0, 1]. The modality LUT (rescale) comes first; the VOI LUT is preferred to the window
    where both are given, as pydicom does; the first of several windows is the default one. The
    result is scaled by the VOI's output range: the window's, or the LUT's lowest and highest entry
    (LUTs declaring 16-bit entries that hold 12-bit values are common)."""
    values = apply_modality_lut(stored, ds)
    lut = ds.get("VOILUTSequence")
    if lut and "LUTDescriptor" in lut[0] and "LUTData" in lut[0]:
        entries, first = int(lut[0].LUTDescriptor[0]) or 2**16, int(lut[0].LUTDescriptor[1])
        table = apply_voi(np.arange(first, first + entries), ds)
        shown = apply_voi(np.rint(values).astype(np.int64), ds)
        low, high = float(table.min()), float(table.max())
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        shown = apply_windowing(values, ds)
        low, high = (float(v) for v in apply_windowing(np.array([-np.inf, np.inf]), ds))
    else:
        return None
    return _unit_range(shown.astype(np.float32), low, high)


def _unit_range(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def check_image(path: str | Path) -> None:
    """Check that an image decodes in full; raises DataError naming the file when it does not.

    Headers alone pass truncated files (a JPEG cut mid-scan, a DICOM whose pixel data ends early),
    so the pixels are decoded: a JPEG at its smallest DCT scale (1/8, which still reads every
    entropy-coded byte), PNG and DICOM at full size."""
    load_image(path, min_side=1)


def dicom_header(path: str | Path) -> pydicom.Dataset:
    """The DICOM header (no pixels) of `path`; raises DataError naming the file when unreadable."""
    path = Path(path)
    try:
        return _dcmread(path, stop_before_pixels=True)
    except _READ_ERRORS as err:
        raise DataError(
            f"cannot read DICOM header ({err})", path, reason=UNREADABLE_IMAGE
        ) from None
