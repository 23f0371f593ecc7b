"""Reading CT volumes (NIfTI, MetaImage `.mhd/.raw` or `.mha`, DICOM series, folders of slice images) in RAS
and HU.

nibabel reads NIfTI (applying the header's rescale slope / intercept), SimpleITK reads MetaImage
and DICOM series (a folder of one series' files, sorted by GDCM along the slice normal, rescale
slope / intercept applied; both in the LPS world frame), and MONAI does the spatial work:
orientation to RAS, resampling to a target spacing, HU windowing;
:func:`~unimed.data.resize.resize_volume` resizes to a shape (torch's "area" along the axes that
shrink, then trilinear). Every failure is a :class:`DataError` naming the file: truncated or
unreadable files, a `.raw` that is missing or short (an `.mha` without the voxels its header
promises), compressed data that is not zlib or gzip, a folder of several DICOM series,
non-positive spacing, NaN voxels, and values that can only come from rescaling stored values that
were already in HU (the double rescale that CT-CLIP's pipeline is known for).

MONAI is imported by the two functions that use it: importing it takes seconds, and every command
imports this module through the dataset adapters, most of them without ever reading a volume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from PIL import Image

from unimed.data.errors import MISSING_IMAGE, UNREADABLE_IMAGE, DataError
from unimed.data.prepared_cache import source_files
from unimed.data.resize import resize_volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
"""Axis letters of the world frame every affine here is written in (nibabel's and MONAI's RAS)."""
DOUBLE_RESCALE_HU = -1500.0
"""No CT voxel lies below this HU (air is -1000, scanners clip at -1024): anything lower means the
stored values were already HU when the rescale intercept was applied again."""
NOT_HU_LOW = -200.0
"""A chest or abdominal CT always holds air; a volume whose lowest 0.1 % lies above this is not HU."""
SLICE_WINDOW = (-1400.0, 200.0)
"""HU of the grey values 0 and 255 in a folder of 8-bit slice images (the CC-CCII layout)."""
SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Pillow modes of slice images wider than 8 bits: 16-bit grey (some files open as 32-bit "I").
WIDE_SLICE_MODES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "16- or 32-bit"}
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mhd", ".mha")
"""The files that are volumes by their name, in any case (a folder is one too: a DICOM series,
slice images)."""


def is_volume_file(path: Path) -> bool:
    """Whether `path` names a volume file by its suffix (``.nii.gz`` and ``.NII.GZ`` alike)."""
    return path.name.lower().endswith(VOLUME_SUFFIXES)


@dataclasses.dataclass
class Volume:
    """A CT volume: `array` (X, Y, Z) float32 HU with axes towards R, A, S; `affine` voxel -> RAS mm."""

    array: np.ndarray
    affine: np.ndarray
    path: Path

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    def world_to_voxel(self, xyz_ras: Sequence[float]) -> np.ndarray:
        """Continuous voxel (i, j, k) of a RAS world point in mm."""
        return (np.linalg.inv(self.affine) @ np.array([*xyz_ras, 1.0]))[:3]

    def contains(self, voxel: np.ndarray) -> bool:
        """Whether a continuous voxel index lies inside the volume (half a voxel of margin)."""
        return bool(np.all(voxel >= -0.5) and np.all(voxel <= np.array(self.array.shape) - 0.5))


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with nib.openers.ImageOpener(str(path)) as f:
            block = f.read(348)
        if len(block) < 348:
            raise DataError(f"cannot read NIfTI volume, truncated or corrupt ({len(block)}-byte header)", path,
                            reason=UNREADABLE_IMAGE)
        stored = nib.Nifti1Header(binaryblock=block, check=False)  # as stored, before nibabel repairs it
        spacing = np.asarray(stored["pixdim"][1:4], dtype=np.float64)
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise DataError(f"voxel spacing {spacing.round(4).tolist()} in the header is not positive and finite",
                            path, reason=UNREADABLE_IMAGE)
        image = nib.funcs.squeeze_image(nib.load(str(path)))  # (X, Y, Z, 1), as some tools write: 3-D
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as err:
        raise DataError(f"cannot read NIfTI volume, truncated or corrupt ({err})", path,
                        reason=UNREADABLE_IMAGE) from None
    return data, image.affine


def _header_fields(path: Path) -> tuple[dict[str, str], int]:
    """A MetaImage header's `key = value` lines (the last of a key given twice), up to
    ElementDataFile, its last; and where that line ends (a header with ElementDataFile = LOCAL
    holds the voxels from there)."""
    fields = {}
    with open(path, "rb") as f:
        for line in iter(f.readline, b""):
            key, _, value = line.decode("utf-8", errors="replace").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
        return fields, f.tell()


def _is_list(fields: dict[str, str]) -> bool:
    """Whether a MetaImage header's voxels are in files listed after it (``ElementDataFile = LIST``)."""
    return fields.get("ElementDataFile", "").split()[:1] == ["LIST"]


def _listed(path: Path, fields: dict[str, str], header_end: int) -> list[str] | None:
    """The data files of an ``ElementDataFile = LIST`` header (one name a line after it, a slice
    each), None for another header."""
    if not _is_list(fields):
        return None
    with open(path, "rb") as f:
        f.seek(header_end)
        return [line.strip() for line in f.read().decode("utf-8", errors="replace").splitlines()
                if line.strip()]


def _data_files(path: Path, fields: dict[str, str], header_end: int) -> list[Path]:
    """The data files a MetaImage header names (ElementDataFile: a `.raw`, or `.zraw` when
    compressed; the slices of a LIST), checked to exist: the header itself for LOCAL."""
    name = fields.get("ElementDataFile")
    if name is None:  # the reader's own error says "No such file or directory"
        raise DataError("the MetaImage header has no ElementDataFile line (its data file's name, or "
                        "LOCAL)", path, reason=UNREADABLE_IMAGE)
    if name == "LOCAL":
        return [path]
    names = _listed(path, fields, header_end)
    if names == []:
        raise DataError("the MetaImage header's ElementDataFile = LIST names no files after it", path,
                        reason=UNREADABLE_IMAGE)
    missing = next((n for n in names or [name] if not (path.parent / n).is_file()), None)
    if missing is not None:
        raise DataError(f"MetaImage data file {missing} not found beside the header", path,
                        reason=MISSING_IMAGE)
    return [path.parent / n for n in names or [name]]


def volume_files(path: Path) -> list[Path]:
    """The files a volume is read from (for :class:`~unimed.data.prepared_cache.PreparedCache`): a
    MetaImage header and the data files it names beside it (the header alone where they are not
    all there: the reader then names what is missing); a folder's files; a file alone."""
    if path.suffix.lower() not in (".mhd", ".mha") or path.is_dir():
        return source_files(path)
    try:
        data = _data_files(path, *_header_fields(path))
    except DataError:
        return [path]
    return [path, *(f for f in data if f != path)]


def _read_mhd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    _, affine = mhd_geometry(path)
    try:
        image = sitk.ReadImage(str(path), imageIO="MetaImageIO")  # by content: an upper-case .MHA too
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise DataError(f"cannot read MetaImage ({first})", path, reason=UNREADABLE_IMAGE) from None
    return sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0), affine  # (x, y, z)


def mhd_geometry(path: Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """(size (X, Y, Z), affine voxel -> RAS mm) from a MetaImage header alone, without its voxels."""
    fields, header_end = _header_fields(path)
    files = _data_files(path, fields, header_end)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("MetaImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise DataError(f"cannot read MetaImage header ({first})", path, reason=UNREADABLE_IMAGE) from None
    if reader.GetDimension() != 3:  # a 2-D image or a 4-D series: the direction is not 3 x 3
        raise DataError(f"expected a 3-D volume, the header says NDims = {reader.GetDimension()}", path,
                        reason=UNREADABLE_IMAGE)
    if not _is_list(fields):  # a LIST's slices are checked by the reader
        _check_data(files[0], fields, int(np.prod(reader.GetSize())) * _pixel_bytes(reader.GetPixelID()),
                    path, start=header_end if files[0] == path else 0)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(reader.GetDirection()).reshape(3, 3) @ np.diag(reader.GetSpacing())
    lps[:3, 3] = reader.GetOrigin()
    return tuple(int(v) for v in reader.GetSize()), LPS_TO_RAS @ lps


def _check_data(raw: Path, fields: dict[str, str], voxel_bytes: int, path: Path, start: int) -> None:
    """DataError when the voxels in `raw` from byte `start` (past the header for LOCAL) are not what
    the header says, which the reader takes for a missing file or decompresses into noise: fewer
    bytes than the voxels need, or than a compressed file's CompressedDataSize (ITK writes it; the
    reader needs it for LOCAL); compressed data that is not zlib or gzip."""
    held = raw.stat().st_size - start
    where = raw.name if start == 0 else f"{raw.name} after its header"
    if fields.get("CompressedData", "False").lower() != "true":
        if held < voxel_bytes:
            raise DataError(f"{where} holds {held} bytes, the header needs {voxel_bytes} (truncated)",
                            path, reason=UNREADABLE_IMAGE)
        return
    stated = fields.get("CompressedDataSize", "")
    if stated.isdigit() and held < int(stated):
        raise DataError(f"{where} holds {held} bytes, the header's CompressedDataSize is {stated} "
                        "(truncated)", path, reason=UNREADABLE_IMAGE)
    if start and not stated.isdigit():
        raise DataError("CompressedData = True with ElementDataFile = LOCAL needs CompressedDataSize",
                        path, reason=UNREADABLE_IMAGE)
    with open(raw, "rb") as f:
        f.seek(start)
        magic = f.read(2)
    zlib_stream = len(magic) == 2 and magic[0] & 0x0F == 8 and int.from_bytes(magic, "big") % 31 == 0
    if not (zlib_stream or magic == b"\x1f\x8b"):
        raise DataError(f"{where} is not zlib or gzip data, though the header says CompressedData = True",
                        path, reason=UNREADABLE_IMAGE)


def _pixel_bytes(pixel_id: int) -> int:
    return {sitk.sitkInt8: 1, sitk.sitkUInt8: 1, sitk.sitkInt16: 2, sitk.sitkUInt16: 2, sitk.sitkInt32: 4,
            sitk.sitkUInt32: 4, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8}.get(pixel_id, 1)


def _slice_files(folder: Path) -> list[Path]:
    """The slice images of a scan folder in slice order (0000 the most inferior)."""
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in SLICE_SUFFIXES),
                   key=lambda p: (len(p.stem), p.stem))
    if not files:
        raise DataError("no slice images in the scan folder", folder, reason=MISSING_IMAGE)
    return files


@contextlib.contextmanager
def itk_warnings_off() -> Iterator[None]:
    """ITK's warnings, which it prints to stderr itself, off inside; the setting restored after. It
    is process-wide, so series read in threads at once may leave it off (they all turn it off)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The one DICOM series in `folder` (its files in any order, named any way): HU voxels (the
    rescale slope and intercept applied) and the affine from the image position, orientation and
    pixel spacing, the slice spacing from the positions of consecutive slices."""
    with itk_warnings_off():  # ITK's "No Series were found" on stderr, before the line below says it
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        inner = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        shown = ", ".join(inner[:3]) + (", ..." if len(inner) > 3 else "")
        hint = f"; it holds sub-folders ({shown}): a volume is the folder of one series" if inner else ""
        raise DataError(f"no slice images and no DICOM series in the scan folder{hint}", folder,
                        reason=MISSING_IMAGE)
    if len(series) > 1:
        raise DataError(f"holds {len(series)} DICOM series (SeriesInstanceUID {', '.join(series)}); "
                        "a volume is the folder of one series", folder, reason=UNREADABLE_IMAGE)
    reader = sitk.ImageSeriesReader()
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with itk_warnings_off():  # ITK's "Non uniform sampling or missing slices": checked below
            image = reader.Execute()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise DataError(f"cannot read DICOM series ({first})", folder, reason=UNREADABLE_IMAGE) from None
    _check_slice_gaps(reader, image, files, folder)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0), LPS_TO_RAS @ lps


def _check_slice_gaps(reader: sitk.ImageSeriesReader, image: sitk.Image, files: Sequence[str],
                      folder: Path) -> None:
    """DataError when the series' slices are not evenly spaced along the slice normal: ITK reads
    a series with a missing slice as evenly spaced at the mean gap (printing a warning only), so
    the volume's geometry would be wrong without a word. Gaps within 10 % of the median pass."""
    if len(files) < 3:
        return
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                              for i in range(len(files))]) @ normal
    except (RuntimeError, ValueError):
        return  # no ImagePositionPatient: ITK spaced the slices by the slice thickness alone
    gaps = np.diff(positions)
    typical = float(np.median(np.abs(gaps)))
    worst = int(np.argmax(np.abs(np.abs(gaps) - typical)))
    if abs(abs(gaps[worst]) - typical) > 0.1 * typical:
        pair = f"{Path(files[worst]).name} and {Path(files[worst + 1]).name}"
        raise DataError(f"slices are not evenly spaced: {abs(gaps[worst]):.3g} mm between {pair}, "
                        f"{typical:.3g} mm between the others (a missing or repeated slice?)", folder,
                        reason=UNREADABLE_IMAGE)


def _read_slices(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A folder of 8-bit slice images (0000 the most inferior; rows anterior to posterior, columns
    patient right to left), mapped back to HU through SLICE_WINDOW. The layout stores no spacing,
    so the affine is the identity (1 mm voxels)."""
    files = _slice_files(folder)
    planes = []
    for file in files:
        try:
            with Image.open(file) as image:
                if image.mode in WIDE_SLICE_MODES:
                    raise DataError(f"a {WIDE_SLICE_MODES[image.mode]} slice image (Pillow mode "
                                    f"{image.mode}): a folder of slice images holds 8-bit grey (0 and "
                                    f"255 the window's {SLICE_WINDOW[0]:g} and {SLICE_WINDOW[1]:g} HU), "
                                    "and converted to it these values would saturate; store the scan as "
                                    "NIfTI, MetaImage or DICOM, in HU", file, reason=UNREADABLE_IMAGE)
                planes.append(np.asarray(image.convert("L"), dtype=np.float32))
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(f"cannot read slice image ({err})", file, reason=UNREADABLE_IMAGE) from None
        if planes[-1].shape != planes[0].shape:
            raise DataError(f"slice is {planes[-1].shape}, the scan's first slice {planes[0].shape} "
                            "(inconsistent slices)", file, reason=UNREADABLE_IMAGE)
    stack = np.stack(planes)[:, ::-1, ::-1]  # (z, y, x) with axes towards S, A, R
    low, high = SLICE_WINDOW
    return np.ascontiguousarray(stack.transpose(2, 1, 0)) / 255.0 * (high - low) + low, np.eye(4)


def check_volume(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """DataError for NaN voxels, bad spacing, or intensities that are not HU."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise DataError(f"voxel spacing {spacing.round(4).tolist()} is not positive and finite", path,
                        reason=UNREADABLE_IMAGE)
    if array.ndim != 3 or min(array.shape) < 2:
        raise DataError(f"expected a 3-D volume, got shape {array.shape}" + (
            " (a single slice: a volume has at least 2 along every axis)" if array.ndim == 3 else ""),
            path, reason=UNREADABLE_IMAGE)
    if not np.isfinite(array).all():
        raise DataError(f"{int((~np.isfinite(array)).sum())} NaN or infinite voxel(s)", path,
                        reason=UNREADABLE_IMAGE)
    low = float(array.min())
    if low < DOUBLE_RESCALE_HU:
        raise DataError(f"values down to {low:.0f} HU: the stored values look rescaled twice (already HU "
                        "before the rescale slope / intercept was applied)", path, reason=UNREADABLE_IMAGE)
    # Fewer than 0.1 % of the voxels at or below NOT_HU_LOW: a count, since a percentile sorts a copy
    # of the volume (over a second for a clinical CT); the percentile is computed only to say so.
    if np.count_nonzero(array <= NOT_HU_LOW) < 0.001 * array.size:
        raise DataError(f"no air in the volume (0.1th percentile {np.percentile(array, 0.1):.0f}): the values "
                        "are not HU (stored values without their rescale intercept?)", path,
                        reason=UNREADABLE_IMAGE)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of `array` in its own memory order. NIfTI voxels are in Fortran order, and making
    a clinical CT C-contiguous costs about a second per volume, while MONAI's orientation and resize
    take the strided view as it is (bit-identical results). Negative strides are copied."""
    return torch.from_numpy(np.ascontiguousarray(array) if min(array.strides) < 0 else array)


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The array re-ordered (MONAI Orientation) so its axes run towards R, A, S, with its new affine."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    tensor = Orientation(axcodes="RAS", labels=RAS_LABELS)(MetaTensor(as_tensor(array)[None],
                                                                      affine=torch.as_tensor(affine)))
    return tensor[0].numpy(), tensor.affine.numpy().astype(np.float64)


def _nifti_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine voxel -> RAS mm) of a NIfTI file from its header alone."""
    try:
        image = nib.load(str(path))
        return tuple(int(v) for v in image.shape), np.asarray(image.affine, dtype=np.float64)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as err:
        raise DataError(f"cannot read NIfTI header, truncated or corrupt ({err})", path,
                        reason=UNREADABLE_IMAGE) from None


def cube_half(size_mm: float, spacing: np.ndarray | float) -> np.ndarray:
    """Whole voxels on each side of the centre voxel of a `size_mm` cube (:func:`crop_cube`) at
    `spacing` mm per voxel: half the side, rounded, at least one."""
    return np.maximum(np.round(size_mm / 2 / np.asarray(spacing)), 1).astype(int)


def axial_depth(path: str | Path, crop_mm: float | None = None) -> int:
    """How many axial (RAS z) slices :func:`read_volume` gives the volume at `path`, or, with
    `crop_mm`, a :func:`crop_cube` of that side cut from it: from the NIfTI or MetaImage header, or
    the slice images a scan folder holds, without reading a voxel (a volume's depth is what slice
    ground truth counts in)."""
    path = Path(path)
    kind = volume_kind(path)
    if kind == "slices":
        depth, spacing = len(_slice_files(path)), 1.0  # the layout's identity affine
    else:
        shape, affine = _nifti_geometry(path) if kind == "nifti" else mhd_geometry(path)
        # The array axis that RAS orientation (MONAI's, through nibabel's) turns into S.
        axis = int(np.flatnonzero(nib.orientations.io_orientation(affine)[:, 0] == 2)[0])
        depth, spacing = shape[axis], float(np.linalg.norm(affine[:3, axis]))
    return depth if crop_mm is None else 2 * int(cube_half(crop_mm, spacing)) + 1


def volume_kind(path: Path) -> str:
    """"slices" (a folder of slice images), "dicom" (any other folder: a DICOM series), "nifti" or
    "mhd"; a DataError naming `path` when it is missing or none of them."""
    if not path.exists():
        raise DataError("volume not found", path, reason=MISSING_IMAGE)
    if path.is_dir():
        return "slices" if any(p.suffix.lower() in SLICE_SUFFIXES for p in path.iterdir()) else "dicom"
    if not is_volume_file(path):
        raise DataError(f"not a volume: expected {', '.join(VOLUME_SUFFIXES)} or a folder (a DICOM "
                        "series or slice images)", path, reason=UNREADABLE_IMAGE)
    return "mhd" if path.suffix.lower() in (".mhd", ".mha") else "nifti"  # .mha: a header holding its voxels


def read_volume(path: str | Path, *, labels: bool = False) -> Volume:
    """A CT volume (or, with `labels`, a label map) from a NIfTI file, a `.mhd` header, a folder of
    one DICOM series or a folder of slice images, re-oriented to RAS; intensities are checked to be
    HU unless `labels`."""
    path = Path(path)
    read = {"slices": _read_slices, "dicom": _read_dicom_series, "nifti": _read_nifti,
            "mhd": _read_mhd}[volume_kind(path)]
    array, affine = read(path)
    if labels:
        if not np.isfinite(array).all():
            raise DataError("NaN labels", path, reason=UNREADABLE_IMAGE)
    else:
        check_volume(array, affine, path)
    array, affine = to_ras(array, affine)
    return Volume(array=array, affine=affine, path=path)


def crop_cube(volume: Volume, centre_ras: Sequence[float], size_mm: float, *, fill: float = -1000.0) -> Volume:
    """The cube of `size_mm` per side centred on a RAS world point (a LUNA16 candidate), in whole
    voxels of `volume` (the centre voxel and as many on each side as half the side covers), with
    its own affine; the part of the cube outside the volume is `fill` (air)."""
    centre = np.round(volume.world_to_voxel(centre_ras)).astype(int)
    half = cube_half(size_mm, np.array(volume.spacing))
    start, stop = centre - half, centre + half + 1
    shape = np.array(volume.array.shape)
    low, high = np.clip(start, 0, shape), np.clip(stop, 0, shape)
    if np.any(high <= low):
        raise DataError(f"crop centred at {np.round(centre_ras, 2).tolist()} mm lies outside the volume",
                        volume.path, reason=UNREADABLE_IMAGE)
    inner = volume.array[tuple(slice(a, b) for a, b in zip(low, high))]
    array = np.pad(inner, list(zip(low - start, stop - high)), constant_values=fill)
    affine = volume.affine.copy()
    affine[:3, 3] = (volume.affine @ np.array([*start, 1.0]))[:3]
    return Volume(array=np.asarray(array, dtype=np.float32), affine=affine, path=volume.path)


def prepare_volume(
    volume: Volume, *, spacing: Sequence[float] | None = None, shape: Sequence[int] | None = None,
    window: tuple[float, float] = (-1000.0, 400.0), labels: bool = False,
) -> torch.Tensor:
    """The (1, X, Y, Z) network input of a RAS volume: resampled to `spacing` mm (MONAI Spacing),
    resized to `shape` (:func:`resize_volume`), and HU windowed to [0, 1] (MONAI
    ScaleIntensityRange). An axis made coarser is averaged down first (for a spacing, MONAI Resize
    "area" to the nearest whole number of voxels, then Spacing's bilinear resampling), so every
    stored voxel reaches the network. Label maps are resampled with nearest neighbours and not
    windowed."""
    from monai.data import MetaTensor
    from monai.transforms import Resize, ScaleIntensityRange, Spacing

    tensor = MetaTensor(as_tensor(np.asarray(volume.array, dtype=np.float32))[None],
                        affine=torch.as_tensor(volume.affine))
    if spacing is not None:
        coarser = [max(1, min(n, round(n * old / new)))
                   for n, old, new in zip(tensor.shape[1:], volume.spacing, spacing)]
        if not labels and coarser != list(tensor.shape[1:]):
            tensor = Resize(spatial_size=coarser, mode="area")(tensor)
        tensor = Spacing(pixdim=tuple(spacing), mode="nearest" if labels else "bilinear")(tensor)
    tensor = tensor.as_tensor()
    if shape is not None:
        tensor = (F.interpolate(tensor[None], size=tuple(shape), mode="nearest")[0] if labels
                  else resize_volume(tensor[None], shape)[0])
    if not labels:
        tensor = ScaleIntensityRange(a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True)(tensor)
    return tensor.as_subclass(torch.Tensor)


def axial_slices(volume: Volume, *, size: int, slices: int,
                 window: tuple[float, float] = (-1000.0, 400.0), labels: bool = False) -> torch.Tensor:
    """(slices, size, size) axial images of a RAS volume in [0, 1], inferior to superior: the
    volume resized (MONAI, trilinear) to size x size x `slices` and HU-windowed, each slice shown
    in the radiological convention (rows anterior to posterior, columns patient right to left),
    the view a 2D encoder gets of a CT through the slice-wise adapter. With `labels` the volume is
    a label map: resized with nearest neighbours, not windowed, so it stays aligned with the image."""
    tensor = prepare_volume(volume, shape=(size, size, slices), window=window, labels=labels)[0]  # (X, Y, Z)
    return tensor.permute(2, 1, 0).flip(1, 2).contiguous()  # (Z, Y, X): rows from A, columns from R
