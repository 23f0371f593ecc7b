"""The four 3D layouts: writer -> adapter round trips in RAS / HU for every site variant, counts
against the manifest, determinism, per-patient splits, and bad volumes named in one clear error."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import re
import shutil
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from data_layouts import write_ct_series

from unimed.cli import main
from unimed.data.adapters import VOLUME_FOLDERS, find_datasets, load_dataset
from unimed.data.errors import DataError
from unimed.data.splits import leaking_patients
from unimed.data.volumes import (
    SLICE_WINDOW,
    Volume,
    axial_depth,
    axial_slices,
    crop_cube,
    prepare_volume,
    read_volume,
    volume_files,
)
from unimed.phantom.config import PhantomConfig
from unimed.phantom.ct.config import CTConfig
from unimed.phantom.ct.generator import generate_ct_study
from unimed.phantom.ct.sites import get_ct_site
from unimed.phantom.ct.world import WRITERS_BY_FOLDER, load_ct_manifest, write_ct_world

TINY = PhantomConfig(seed=2, ct=CTConfig(enabled=True, shape=(16, 64, 64), bimcv_studies=4, ccii_studies=6,
                                         luna_studies=6, bcv_studies=4))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct-world")
    return root, write_ct_world(TINY, root, progress=False)


def _study(folder: str, index: int):
    writer = WRITERS_BY_FOLDER[folder](TINY, Path())
    return generate_ct_study(TINY.ct, TINY.seed, writer.dataset, index, site=writer.site(index), enrich=writer.enrich)


def test_read_back_matches_the_manifest(world, tmp_path):
    root, manifest = world
    assert load_ct_manifest(root) == manifest
    for name, folder in VOLUME_FOLDERS.items():
        read = load_dataset(name, root / folder, split_dir=tmp_path, check_images=True)
        expected = manifest.datasets[folder]
        assert len(read.records) == expected.studies and not read.dropped
        assert all(r.ndim == 3 for r in read.records)
        for label, count in expected.positives.items():
            got = sum(r.labels.get(label) == 1.0 or r.target == label or
                      (r.mask_path is not None and label in expected.positives) for r in read.records)
            assert got == count, (name, label)
        rows = [(r.image_path.as_posix(), r.patient_id, r.split) for r in read.records]
        assert not leaking_patients(rows) and (tmp_path / f"{name}.csv").is_file()


def test_check_data_finds_and_reads_every_3d_layout(world, capsys):
    root, manifest = world
    assert find_datasets(root) == ["bimcv-covid19", "cc-ccii", "luna16", "bcv", "luna16-candidates"]
    assert main(["check-data", "--root", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    for name in find_datasets(root):
        records = len(load_dataset(name, root / VOLUME_FOLDERS.get(name, "luna16")).records)
        assert re.search(rf"│ {name} +│ {records} +│", out), name


def test_same_seed_same_bytes(world, tmp_path):
    root, _ = world
    again = tmp_path / "again"
    write_ct_world(dataclasses.replace(TINY, workers=2), again, progress=False)

    def digest(base: Path) -> str:
        h = hashlib.sha256()
        for path in sorted(p for p in base.rglob("*") if p.is_file() and p.name != "manifest-ct.json"):
            h.update(path.relative_to(base).as_posix().encode() + path.read_bytes())
        return h.hexdigest()

    assert digest(root) == digest(again)


@pytest.mark.parametrize("folder", ["bimcv-covid19", "bcv"])
def test_nifti_layouts_recover_hu_in_ras_for_both_sites(world, folder):
    root, _ = world
    name = next(n for n, f in VOLUME_FOLDERS.items() if f == folder)
    records = load_dataset(name, root / folder).records
    seen = set()
    for index in range(len(records)):
        study = _study(folder, index)
        acq = get_ct_site(study.site).acquisition
        seen.add((acq.orientation, acq.storage))
        if folder == "bcv":
            path = root / folder / "img" / f"img{index + 1:04d}.nii.gz"
        else:
            path = next((root / folder).glob(f"sub-S{study.patient_id}/ses-E{study.study_id}/mod-ct/*.nii.gz"))
        volume = read_volume(path)
        np.testing.assert_array_equal(volume.array, study.hu.transpose(2, 1, 0).astype(np.float32))
        np.testing.assert_allclose(volume.affine, study.affine(), atol=1e-4)
        if folder == "bcv":
            labels = read_volume(root / folder / "label" / f"label{index + 1:04d}.nii.gz", labels=True)
            np.testing.assert_array_equal(labels.array, study.organs.transpose(2, 1, 0))
    assert {o for o, _ in seen} == {"RAS", "LPS"}


def test_luna_nodule_world_mm_maps_back_to_its_voxel(world):
    root, _ = world
    records = load_dataset("luna16", root / "luna16").records
    by_uid = {r.patient_id: r for r in records}
    orientations, checked = set(), 0
    from unimed.phantom.ct.writers import LUNA_UID_ROOT
    from unimed.phantom.writers.base import stable_int

    for index in range(TINY.ct.luna_studies):
        study = _study("luna16", index)
        record = by_uid[LUNA_UID_ROOT + str(stable_int("luna-uid", TINY.seed, index))]
        nodules = [lesion for lesion in study.lesions if lesion.name == "nodule"]
        assert record.labels["nodule"] == float(bool(nodules)) and len(record.points) == len(nodules)
        volume = read_volume(record.image_path)
        np.testing.assert_array_equal(volume.array, study.hu.transpose(2, 1, 0).astype(np.float32))
        orientations.add(get_ct_site(study.site).acquisition.orientation)
        for point, lesion in zip(record.points, nodules):
            voxel = volume.world_to_voxel((point.x, point.y, point.z))
            k, j, i = lesion.centre_voxel
            np.testing.assert_allclose(voxel, (i, j, k), atol=1e-3)
            assert point.diameter_mm == pytest.approx(lesion.diameter_mm)
            checked += 1
    assert checked >= 1 and orientations == {"RAS", "LPS"}


def test_ccii_slices_come_back_as_windowed_hu(world):
    root, _ = world
    records = load_dataset("cc-ccii", root / "cc-ccii").records
    low, high = SLICE_WINDOW
    for index in range(len(records)):
        study = _study("cc-ccii", index)
        record = next(r for r in records if r.image_path.parent.name == study.patient_id
                      and r.target == study.ccii_class and r.image_path.parent.parent.name == study.ccii_class)
        volume = read_volume(record.image_path)
        assert volume.array.shape == study.hu.shape[::-1]
        expected = np.clip(study.hu.transpose(2, 1, 0), low, high)
        assert np.abs(volume.array - expected).max() <= (high - low) / 255 / 2 + 1e-3
        break


def test_prepare_volume_resamples_and_windows(world):
    root, _ = world
    path = next((root / "bcv" / "img").glob("*.nii.gz"))
    volume = read_volume(path)
    tensor = prepare_volume(volume, spacing=(4.0, 4.0, 8.0))
    extent = np.array(volume.array.shape) * np.array(volume.spacing)
    assert tensor.shape[0] == 1
    np.testing.assert_allclose(np.array(tensor.shape[1:]), extent / np.array([4.0, 4.0, 8.0]), atol=1.5)
    assert float(tensor.min()) == 0.0 and float(tensor.max()) == 1.0
    labels = read_volume(root / "bcv" / "label" / path.name.replace("img", "label"), labels=True)
    resized = prepare_volume(labels, shape=(32, 32, 16), labels=True)
    assert resized.shape == (1, 32, 32, 16) and set(np.unique(resized.numpy())) <= set(np.unique(labels.array))


def _slab(depth: int, k: int, *, side: int = 16) -> Volume:
    """A volume of air (-1000 HU) with slice `k` of `depth` at soft tissue (40 HU), 2 mm voxels."""
    array = np.full((side, side, depth), -1000.0, np.float32)
    array[:, :, k] = 40.0
    return Volume(array=array, affine=np.diag([2.0, 2.0, 2.0, 1.0]), path=None)


@pytest.mark.parametrize("depth, slices", [(32, 8), (40, 5), (32, 16)])
def test_fewer_slices_still_see_every_slice(depth, slices):
    """Downsampling averages: a finding on any one slice of the volume reaches the fewer slices an
    encoder reads with the same weight wherever it lies (trilinear sampling alone never reads half
    the slices at 32 -> 8), and what the slices hold in all is kept."""
    window = (-1000.0, 400.0)
    peaks = []
    for k in range(depth):
        out = axial_slices(_slab(depth, k), size=16, slices=slices, window=window)
        assert out.shape == (slices, 16, 16)
        peaks.append(float(out.sum(dim=(1, 2)).max()))
        assert float(out.sum()) * depth / slices == pytest.approx(16 * 16 * 1040 / 1400, rel=1e-4), k
    assert min(peaks) == pytest.approx(max(peaks), rel=1e-4)


def test_averaging_keeps_the_edges_of_an_hu_volume():
    """Air at the border of a volume stays air (a smoothing filter padded with zeros would read it
    as water there)."""
    air = Volume(array=np.full((16, 16, 32), -1000.0, np.float32), affine=np.eye(4), path=None)
    assert float(axial_slices(air, size=8, slices=4).abs().max()) == 0.0


def test_labels_are_not_averaged():
    labels = np.zeros((16, 16, 32), np.float32)
    labels[4:12, 4:12, 8:24] = 3.0
    out = prepare_volume(Volume(array=labels, affine=np.eye(4), path=None), shape=(8, 8, 8), labels=True)
    assert set(np.unique(out.numpy())) == {0.0, 3.0}


def test_a_coarser_spacing_sees_every_slice():
    """Resampling to a coarser spacing averages first, as resizing does: every slice counts."""
    sums = [float(prepare_volume(_slab(32, k), spacing=(2.0, 2.0, 8.0)).sum()) for k in range(32)]
    assert sums == pytest.approx([16 * 16 * 1040 / 1400 / 4] * 32, rel=1e-4)
    one = [prepare_volume(_slab(32, k), spacing=(2.0, 2.0, 1000.0)) for k in (0, 5, 31)]  # one slice left
    assert all(o.shape == (1, 16, 16, 1) for o in one)
    assert [float(o.sum()) for o in one] == pytest.approx([16 * 16 * 1040 / 1400 / 32] * 3, rel=1e-4)


def _nifti(path: Path, data: np.ndarray, *, slope=np.nan, inter=np.nan) -> Path:
    image = nib.Nifti1Image(data, np.diag([2.0, 2.0, 5.0, 1.0]))
    image.header.set_slope_inter(slope, inter)
    nib.save(image, str(path))
    return path


def _body(dtype=np.int16) -> np.ndarray:
    data = np.full((12, 12, 6), -1000, dtype=np.int32)
    data[3:9, 3:9] = 40
    return data.astype(dtype)


def test_bad_volumes_give_one_clear_error(tmp_path):
    good = _nifti(tmp_path / "good.nii.gz", _body())
    assert read_volume(good).array.min() == -1000
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DataError, match=r"truncated\.nii\.gz: cannot read NIfTI"):
        read_volume(truncated)
    twice = _nifti(tmp_path / "twice.nii.gz", _body(), slope=1.0, inter=-1024.0)
    with pytest.raises(DataError, match=r"twice\.nii\.gz: values down to -2024 HU: .*rescaled twice"):
        read_volume(twice)
    raw = _nifti(tmp_path / "raw.nii.gz", (_body(np.int32) + 1024).astype(np.uint16))
    with pytest.raises(DataError, match=r"raw\.nii\.gz: no air .* not HU"):
        read_volume(raw)
    nan = _body(np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(DataError, match=r"nan\.nii\.gz: 1 NaN"):
        read_volume(_nifti(tmp_path / "nan.nii.gz", nan))
    flat = bytearray(_nifti(tmp_path / "flat.nii", _body()).read_bytes())
    flat[84:88] = np.float32(0.0).tobytes()  # pixdim[2]: the y spacing of the qform affine
    flat[252:256] = np.int16(1).tobytes() + np.int16(0).tobytes()  # qform_code 1, sform_code 0
    (tmp_path / "flat.nii").write_bytes(bytes(flat))
    with pytest.raises(DataError, match=r"flat\.nii: voxel spacing \[2\.0, 0\.0, 5\.0\] .* not positive"):
        read_volume(tmp_path / "flat.nii")
    with pytest.raises(DataError, match="volume not found"):
        read_volume(tmp_path / "absent.nii.gz")


def test_a_slice_folder_of_16_bit_images_is_named_not_clipped(tmp_path):
    """The slice layout holds 8-bit grey in SLICE_WINDOW; a 16-bit slice (HU + 1024, say) converted
    to 8-bit grey saturates at 255, and the scan read as tissue at the window's top throughout."""
    scan = tmp_path / "scan"
    scan.mkdir()
    for i, plane in enumerate(np.random.default_rng(0).integers(0, 3000, (4, 32, 32))):
        Image.fromarray(plane.astype(np.uint16)).save(scan / f"{i:04d}.png")
    with pytest.raises(DataError, match=r"0000\.png: a 16-bit slice image \(Pillow mode I;16\): .*8-bit"):
        read_volume(scan)


def test_a_nifti_with_a_trailing_unit_axis_is_the_volume_and_several_volumes_are_named(tmp_path):
    body = (_body(np.int32) + 1024).astype(np.uint16)  # stored values, HU through the intercept
    three = read_volume(_nifti(tmp_path / "three.nii.gz", body, slope=1.0, inter=-1024.0))
    four = read_volume(_nifti(tmp_path / "four.nii.gz", body[..., None], slope=1.0, inter=-1024.0))
    np.testing.assert_array_equal(three.array, _body(np.float32))
    np.testing.assert_array_equal(four.array, three.array)
    np.testing.assert_array_equal(four.affine, three.affine)
    with pytest.raises(DataError, match=r"series\.nii\.gz: expected a 3-D volume, got shape "
                                        r"\(12, 12, 6, 2\)"):
        read_volume(_nifti(tmp_path / "series.nii.gz", np.stack([body, body], axis=-1)))
    with pytest.raises(DataError, match=r"slice\.nii\.gz: expected a 3-D volume, got shape \(12, 12, 1\) "
                                        r"\(a single slice: a volume has at least 2 along every axis\)$"):
        read_volume(_nifti(tmp_path / "slice.nii.gz", body[..., :1]))


@pytest.mark.parametrize("shape", [(12, 12), (2, 6, 12, 12)])
def test_a_metaimage_of_other_than_three_dimensions_is_named(tmp_path, shape):
    """A 2-D or 4-D .mhd was a ValueError traceback from the header's direction matrix (not 3 x 3),
    past --on-error skip."""
    path = tmp_path / "scan.mhd"
    (tmp_path / "scan.raw").write_bytes(np.zeros(shape, dtype=np.int16).tobytes())
    path.write_text(f"ObjectType = Image\nNDims = {len(shape)}\nDimSize = {' '.join(map(str, shape[::-1]))}\n"
                    "ElementType = MET_SHORT\nElementDataFile = scan.raw\n")
    with pytest.raises(DataError, match=rf"scan\.mhd: expected a 3-D volume, the header says NDims = "
                                        rf"{len(shape)}"):
        read_volume(path)


def test_a_dicom_series_folder_reads_in_hu_and_ras(tmp_path):
    """GDCM sorts the slices by position (they are written in reverse, named without a suffix),
    the rescale applies, and the LPS rows / columns come back towards R and A: the expected array
    and affine are worked out here from the series' own geometry."""
    hu = np.round(np.random.default_rng(0).uniform(-1000, 400, (5, 6, 7))).astype(np.float32)  # (Z, Y, X)
    (sx, sy, sz), (ox, oy, oz) = (0.7, 0.8, 2.5), (-100.0, -120.0, 50.0)
    folder = write_ct_series(tmp_path / "series", hu, spacing=(sx, sy, sz), origin=(ox, oy, oz),
                             slope=2.0, intercept=-1024.0)
    volume = read_volume(folder)
    expected = hu.transpose(2, 1, 0)[::-1, ::-1, :]  # LPS (x to L, y to P) -> RAS
    np.testing.assert_allclose(volume.array, np.round((expected + 1024) / 2) * 2 - 1024)
    corner = [-(ox + (hu.shape[2] - 1) * sx), -(oy + (hu.shape[1] - 1) * sy), oz]  # RAS voxel (0, 0, 0)
    np.testing.assert_allclose(volume.affine, [[sx, 0, 0, corner[0]], [0, sy, 0, corner[1]],
                                               [0, 0, sz, corner[2]], [0, 0, 0, 1]], atol=1e-6)


def test_a_series_with_a_missing_slice_is_named_not_read_at_the_mean_gap(tmp_path, capfd):
    """ITK reads it evenly spaced at the mean gap (2.81 mm for nine of ten 2.5 mm slices) and only
    prints a warning (not shown: the error says it): every millimetre after the gap would be off."""
    hu = np.full((10, 8, 8), -1000.0, dtype=np.float32)
    hu[:, 2:6, 2:6] = 40.0
    folder = write_ct_series(tmp_path / "series", hu)
    assert read_volume(folder).spacing == pytest.approx((0.7, 0.8, 2.5))
    (folder / "IM0004").unlink()  # written in reverse: slice 5 of 0-9
    capfd.readouterr()
    with pytest.raises(DataError, match=r"series: slices are not evenly spaced: 5 mm between IM0005 and "
                                        r"IM0003, 2.5 mm between the others \(a missing or repeated "
                                        r"slice\?\)$"):
        read_volume(folder)
    assert "WARNING" not in capfd.readouterr().err


def test_a_folder_that_holds_no_series_or_two_is_named(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    capfd.readouterr()
    with pytest.raises(DataError, match=r"empty: no slice images and no DICOM series in the scan folder"):
        read_volume(tmp_path / "empty")
    assert "WARNING" not in capfd.readouterr().err  # ITK's own "No Series were found", before the line
    write_ct_series(tmp_path / "study" / "series-2", np.full((2, 4, 4), -1000.0, dtype=np.float32))
    with pytest.raises(DataError, match=r"study: no slice images and no DICOM series in the scan folder; "
                                        r"it holds sub-folders \(series-2\): a volume is the folder of "
                                        r"one series$"):
        read_volume(tmp_path / "study")
    hu = np.full((2, 4, 4), -1000.0, dtype=np.float32)
    write_ct_series(tmp_path / "two" / "a", hu)
    write_ct_series(tmp_path / "two" / "b", hu)
    for file in (tmp_path / "two" / "b").iterdir():
        file.rename(tmp_path / "two" / "a" / f"b{file.name}")
    with pytest.raises(DataError, match=r"a: holds 2 DICOM series \(SeriesInstanceUID .*\); a volume is "
                                        r"the folder of one series"):
        read_volume(tmp_path / "two" / "a")


def test_the_axial_depth_from_a_header_is_the_depth_of_the_volume_read(world, tmp_path):
    root, _ = world
    for name, folder in [*VOLUME_FOLDERS.items(), ("luna16-candidates", "luna16")]:
        records = load_dataset(name, root / folder, split_dir=tmp_path).records
        assert records, name
        for record in records:
            volume = read_volume(record.image_path)
            if record.crop is not None:  # a candidate: its cube's depth
                crop = record.crop
                volume = crop_cube(volume, (crop.x, crop.y, crop.z), crop.size_mm)
            assert axial_depth(record.image_path, record.crop and record.crop.size_mm) == \
                volume.array.shape[2], (name, record.image_path)
    # Axes stored in another order: superior-inferior is the array's first axis, reversed, 2 mm apart.
    data = _body().transpose(2, 0, 1)  # (6, 12, 12)
    affine = np.array([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, -5.0, 0.0], [-2.0, 0.0, 0.0, 0.0], [0, 0, 0, 1]])
    path = tmp_path / "permuted.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    volume = read_volume(path)
    assert volume.array.shape == (12, 12, 6) and axial_depth(path) == 6
    # An 11 mm cube at 2 mm: round(2.75) = 3 slices each side of the centre, 7 in all.
    assert axial_depth(path, 11.0) == crop_cube(volume, (0.0, 0.0, -4.0), 11.0).array.shape[2] == 7
    with pytest.raises(DataError, match="volume not found"):
        axial_depth(tmp_path / "absent.nii.gz")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(b"\0" * 100))
    with pytest.raises(DataError, match=r"truncated\.nii\.gz: cannot read NIfTI header"):
        axial_depth(truncated)


def test_a_compressed_metaimage_reads_and_a_truncated_one_is_named(tmp_path):
    """ITK and SimpleITK write a compressed MetaImage (`useCompression`) as a `.zraw` far smaller
    than the voxels: its size is checked against the header's CompressedDataSize, not the voxels'."""

    hu = _body(np.int16)
    image = sitk.GetImageFromArray(hu.transpose(2, 1, 0))
    image.SetSpacing((0.7, 0.7, 2.5))
    sitk.WriteImage(image, str(tmp_path / "c.mhd"), useCompression=True)
    data = tmp_path / "c.zraw"
    assert data.stat().st_size < hu.nbytes
    volume = read_volume(tmp_path / "c.mhd")
    np.testing.assert_array_equal(volume.array, hu[::-1, ::-1].astype(np.float32))  # LPS -> RAS
    data.write_bytes(data.read_bytes()[:50])
    with pytest.raises(DataError, match=r"c\.mhd: c\.zraw holds 50 bytes, the header's CompressedDataSize is "
                                        r"\d+ \(truncated\)"):
        read_volume(tmp_path / "c.mhd")


def test_a_metaimage_holding_its_voxels_reads_and_a_bad_data_stream_is_named(tmp_path):
    """A .mha file (its header with ElementDataFile = LOCAL, then its voxels) was "not a volume";
    with no voxels after the header ITK's error was "No such file or directory"; a CompressedData
    header over data that is not zlib was read as noise and blamed on a rescale applied twice."""
    hu = _body(np.int16)
    image = sitk.GetImageFromArray(hu.transpose(2, 1, 0))
    for name, compressed in (("l.mha", False), ("lz.mha", True)):
        sitk.WriteImage(image, str(tmp_path / name), useCompression=compressed)
        np.testing.assert_array_equal(read_volume(tmp_path / name).array, hu[::-1, ::-1].astype(np.float32))
    local = tmp_path / "l.mha"
    text = local.read_bytes()
    head = text[: text.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")]
    local.write_bytes(head)
    with pytest.raises(DataError, match=rf"l\.mha: l\.mha after its header holds 0 bytes, the header needs "
                                        rf"{hu.nbytes} \(truncated\)"):
        read_volume(local)
    packed = tmp_path / "lz.mha"
    text = packed.read_bytes()
    packed.write_bytes(re.sub(rb"CompressedDataSize = \d+\n", b"", text))
    with pytest.raises(DataError, match=r"lz\.mha: CompressedData = True with ElementDataFile = LOCAL needs "
                                        r"CompressedDataSize"):
        read_volume(packed)
    sitk.WriteImage(image, str(tmp_path / "p.mhd"))
    header = tmp_path / "p.mhd"
    header.write_text(header.read_text().replace("ElementDataFile", "CompressedData = True\nElementDataFile"))
    with pytest.raises(DataError, match=r"p\.mhd: p\.raw is not zlib or gzip data, though the header says "
                                        r"CompressedData = True"):
        read_volume(header)
    header.write_text("".join(line for line in header.read_text().splitlines(keepends=True)
                              if not line.startswith("ElementDataFile")))
    with pytest.raises(DataError, match=r"p\.mhd: the MetaImage header has no ElementDataFile line"):
        read_volume(header)


def test_a_metaimage_of_listed_slices_and_upper_case_names_read(tmp_path):
    """ElementDataFile = LIST (one file a slice, named after the header) was "data file LIST 2D not
    found"; an upper-case ``.MHA`` or ``.NII.GZ`` was "not a volume", and left out of a folder."""
    hu = _body(np.int16)  # (x, y, z)
    want = hu[::-1, ::-1].astype(np.float32)  # LPS -> RAS
    image = sitk.GetImageFromArray(hu.transpose(2, 1, 0))
    sitk.WriteImage(image, str(tmp_path / "up.mha"))
    (tmp_path / "up.mha").rename(tmp_path / "UP.MHA")
    np.testing.assert_array_equal(read_volume(tmp_path / "UP.MHA").array, want)
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    (tmp_path / "ct.nii.gz").rename(tmp_path / "CT.NII.GZ")
    np.testing.assert_array_equal(read_volume(tmp_path / "CT.NII.GZ").array, want)
    slices = [f"slice{z:03d}.raw" for z in range(hu.shape[2])]
    for z, name in enumerate(slices):
        (tmp_path / name).write_bytes(np.ascontiguousarray(hu[:, :, z].T).tobytes())
    header = tmp_path / "listed.mhd"
    header.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = {' '.join(map(str, hu.shape))}\n"
                      "ElementType = MET_SHORT\nElementDataFile = LIST 2D\n" + "\n".join(slices) + "\n")
    np.testing.assert_array_equal(read_volume(header).array, want)
    assert volume_files(header) == [header, *(tmp_path / name for name in slices)]
    (tmp_path / slices[2]).unlink()
    with pytest.raises(DataError, match=rf"listed\.mhd: MetaImage data file {slices[2]} not found beside"):
        read_volume(header)
    header.write_text(header.read_text().split("LIST 2D")[0] + "LIST 2D\n")
    with pytest.raises(DataError, match=r"listed\.mhd: the MetaImage header's ElementDataFile = LIST names "):
        read_volume(header)


def test_bad_luna_input(world, tmp_path):
    root, _ = world
    luna = tmp_path / "luna16"
    shutil.copytree(root / "luna16", luna)
    header = sorted(luna.glob("subset*/*.mhd"))[0]
    raw = header.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"\.mhd: .*\.raw holds 1000 bytes.*truncated"):
        read_volume(header)
    raw.unlink()
    with pytest.raises(DataError, match=r"\.mhd: MetaImage data file .*\.raw not found"):
        load_dataset("luna16", luna)
    skipped = load_dataset("luna16", luna, on_error="skip")
    assert len(skipped.records) == TINY.ct.luna_studies - 1 and sum(skipped.dropped.values()) >= 1
    shutil.rmtree(luna)
    shutil.copytree(root / "luna16", luna)
    uid = sorted(luna.glob("subset*/*.mhd"))[0].stem
    with (luna / "annotations.csv").open("a", encoding="utf-8") as f:
        f.write(f"{uid},5000.0,0.0,0.0,10.0\n")
    lines = (luna / "annotations.csv").read_text(encoding="utf-8").count("\n")
    with pytest.raises(DataError, match=rf"annotations\.csv, line {lines}: nodule at .* outside the volume"):
        load_dataset("luna16", luna)


@pytest.mark.parametrize("inner", ["Training", "RawData/Training"])
def test_bcv_reads_its_download_as_unpacked(world, tmp_path, inner):
    """BCV's RawData.zip unpacks to RawData/Training/{img,label} (and RawData/Testing/img, without
    label maps): a dataset folder holding it reads the training volumes."""
    root, _ = world
    bcv = tmp_path / "bcv"
    shutil.copytree(root / "bcv", bcv / inner)
    (bcv / inner / "../Testing/img").resolve().mkdir(parents=True)
    read = load_dataset("bcv", bcv, split_dir=tmp_path)
    assert len(read.records) == TINY.ct.bcv_studies
    assert {r.image_path.parent for r in read.records} == {bcv / inner / "img"}
    shutil.rmtree(bcv / inner)
    with pytest.raises(DataError, match=r"bcv: no img/img\*\.nii\.gz volumes \(looked in \., Training, "
                                        r"RawData/Training\)"):
        load_dataset("bcv", bcv)


def test_bad_ccii_and_bcv_input(world, tmp_path):
    root, _ = world
    ccii = tmp_path / "cc-ccii"
    shutil.copytree(root / "cc-ccii", ccii)
    scan = next(p for p in ccii.glob("*/*/*") if p.is_dir())
    sorted(scan.glob("*.png"))[-1].unlink()
    with pytest.raises(DataError, match=r"unzip_filenames\.csv, line \d+, column 'n_slice': .* 15 slice image"):
        load_dataset("cc-ccii", ccii)
    bcv = tmp_path / "bcv"
    shutil.copytree(root / "bcv", bcv)
    (bcv / "label" / "label0002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"img0002\.nii\.gz: label map label/label0002\.nii\.gz missing"):
        load_dataset("bcv", bcv)
    (bcv / "img" / "img0003.nii.gz").write_bytes(gzip.compress(b"not a nifti"))
    read = load_dataset("bcv", bcv, on_error="skip", check_images=True)
    assert len(read.records) == TINY.ct.bcv_studies - 2 and read.dropped
    # A truncated label map: `unimed check-data` read the volumes only and said OK, and the
    # segmentation stopped on it later.
    label = bcv / "label" / "label0001.nii.gz"
    label.write_bytes(label.read_bytes()[:500])
    assert len(load_dataset("bcv", bcv, on_error="skip").records) == TINY.ct.bcv_studies - 1  # not read
    with pytest.raises(DataError, match=r"label0001\.nii\.gz: cannot read NIfTI volume"):
        load_dataset("bcv", bcv, on_error="raise", check_images=True)
    read = load_dataset("bcv", bcv, on_error="skip", check_images=True)
    assert len(read.records) == TINY.ct.bcv_studies - 3


def test_ccii_scans_of_archives_not_unzipped_are_left_out_and_counted(world, tmp_path, caplog):
    """CC-CCII comes as many zip archives and `unzip_filenames.csv` lists the scans of all of them:
    the scans of an archive with no folder here are left out and counted, with one warning; a
    missing scan of an archive that is here is still a bad row, and a table none of whose archives
    is here an error."""
    root, _ = world
    ccii = tmp_path / "cc-ccii"
    shutil.copytree(root / "cc-ccii", ccii)
    table = ccii / "unzip_filenames.csv"
    header, *rows = [line.split(",") for line in table.read_text(encoding="utf-8").splitlines()]
    gone = rows[0][0]
    for zip_file, label, patient, scan, _ in rows:
        if zip_file == gone:
            shutil.rmtree(ccii / label / patient / scan)
    kept = [row for row in rows if row[0] != gone]
    with caplog.at_level(logging.WARNING):
        read = load_dataset("cc-ccii", ccii, split_dir=tmp_path / "some")
    assert sorted(r.study_id for r in read.records) == sorted(row[3] for row in kept)
    assert read.dropped == {"archive not unzipped": len(rows) - len(kept)}
    warned = [r.getMessage() for r in caplog.records if "partial download" in r.getMessage()]
    assert warned == [f"cc-ccii: {len(rows) - len(kept)} row(s) left out, archive not unzipped (1, e.g. "
                      f"{gone}): a partial download?"]
    with table.open("a", encoding="utf-8") as f:
        f.write(f"{kept[0][0]},{kept[0][1]},{kept[0][2]},999999,8\n")
    with pytest.raises(DataError, match=rf"unzip_filenames\.csv, line {len(rows) + 2}\b.*volume not found"):
        load_dataset("cc-ccii", ccii, split_dir=tmp_path / "bad")
    table.write_text(",".join(header) + "\n" + ",".join(rows[0]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"cc-ccii: none of the 1 row\(s\) its tables list is here \(archive "
                                        r"not unzipped: 1, e\.g\. .*\): is this the dataset's folder\?"):
        load_dataset("cc-ccii", ccii, split_dir=tmp_path / "none")


def test_bimcv_reports_are_cleaned_like_every_other_report(world, tmp_path):
    root, _ = world
    bimcv = tmp_path / "bimcv-covid19"
    shutil.copytree(root / "bimcv-covid19", bimcv)
    table = bimcv / "derivatives/labels/labels_covid_posi.tsv"
    lines = table.read_text(encoding="utf-8").splitlines()
    report = lines[0].split("\t").index("Report")
    gaps = ["Derrame  pleural XXXX izquierdo. Sin ___ neumotórax .",
            "Derrame pleural izquierdo. Sin neumotórax."]
    rows = [line.split("\t") for line in lines[1:]]
    for i, row in enumerate(rows):
        row[report] = gaps[i % 2]
    table.write_text("\n".join([lines[0], *("\t".join(r) for r in rows)]) + "\n", encoding="utf-8")
    read = load_dataset("bimcv-covid19", bimcv, split_dir=tmp_path)
    assert len(read.records) == len(rows)
    assert {r.report for r in read.records} == {"Derrame pleural izquierdo. Sin neumotórax."}


def test_a_bimcv_session_with_several_ct_runs_reads_its_series_with_the_most_slices(world, tmp_path,
                                                                                     caplog):
    """A BIMCV session can hold several CT runs (a scout, another reconstruction): the session's
    report goes with its series of the most slices, not with whichever file sorts first, and the
    log says how many sessions had a choice."""
    root, _ = world
    bimcv = tmp_path / "bimcv-covid19"
    shutil.copytree(root / "bimcv-covid19", bimcv)
    full = sorted(bimcv.glob("*/*/mod-ct/*_run-1_bp-chest_ct.nii.gz"))[0]
    scout = _nifti(full.parent / full.name.replace("run-1", "run-0"), _body())  # 6 slices, sorts first
    with caplog.at_level(logging.WARNING):
        read = load_dataset("bimcv-covid19", bimcv, split_dir=tmp_path)
    paths = [r.image_path for r in read.records]
    assert full in paths and scout not in paths and len(paths) == TINY.ct.bimcv_studies
    warned = [r.getMessage() for r in caplog.records if "several CT volumes" in r.getMessage()]
    assert len(warned) == 1 and "1 session(s)" in warned[0] and full.name in warned[0], warned


@pytest.mark.parametrize("lps", [False, True])
def test_fortran_ordered_volumes_are_prepared_without_a_copy_and_bit_identical(tmp_path, lps):
    """NIfTI voxels come in Fortran order; the reader keeps that view (no C-order copy of the whole
    volume) and the prepared slices equal those of a C-contiguous copy, for RAS and LPS storage."""
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 400, (20, 18, 9)).astype(np.int16)
    affine = np.diag([-0.7, -0.7, 2.0, 1.0] if lps else [0.7, 0.7, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "v.nii.gz"))
    volume = read_volume(tmp_path / "v.nii.gz")
    assert volume.array.flags["F_CONTIGUOUS"] and not volume.array.flags["C_CONTIGUOUS"]
    copy = Volume(array=np.ascontiguousarray(volume.array), affine=volume.affine, path=volume.path)
    assert torch.equal(axial_slices(volume, size=8, slices=4), axial_slices(copy, size=8, slices=4))
    assert np.array_equal(volume.array, (data[::-1, ::-1] if lps else data).astype(np.float32))


@pytest.fixture(scope="module")
def labelled_world(tmp_path_factory):
    """CC-CCII and LUNA16 at 40 volumes each, enough for every class to have a place in every split."""
    cfg = PhantomConfig(seed=2, ct=CTConfig(enabled=True, shape=(8, 32, 32), bimcv_studies=1, ccii_studies=40,
                                            luna_studies=40, bcv_studies=1))
    root = tmp_path_factory.mktemp("ct-labelled")
    write_ct_world(cfg, root, progress=False)
    return root


@pytest.mark.parametrize("name", ["luna16", "cc-ccii"])
def test_single_label_volumes_are_carved_per_patient_stratified_by_class(labelled_world, name):
    records = load_dataset(name, labelled_world / VOLUME_FOLDERS[name]).records
    classes, split_of = {}, {}
    for r in records:  # a patient's stratum: the classes of its scans
        classes.setdefault(r.patient_id, set()).add(r.target)
        split_of[r.patient_id] = r.split
    strata = {p: "+".join(sorted(c)) for p, c in classes.items()}
    sizes, splits = Counter(strata.values()), Counter(split_of.values())
    table = Counter((strata[p], split_of[p]) for p in strata)
    for stratum, size in sizes.items():
        for split, n in splits.items():
            assert abs(table[stratum, split] - size * n / len(strata)) < 1, (stratum, split, dict(table))


def _candidate_rows(luna: Path) -> list[list[str]]:
    return [line.split(",") for line in (luna / "candidates.csv").read_text(encoding="utf-8").splitlines()[1:]]


def test_luna_candidates_are_cubes_around_each_row_of_candidates_csv(world, tmp_path):
    root, _ = world
    rows = _candidate_rows(root / "luna16")
    read = load_dataset("luna16-candidates", root / "luna16", split_dir=tmp_path)
    records = read.records
    assert not read.dropped and len(records) == len(rows)
    by_centre = {(r.patient_id, round(r.crop.x, 3), round(r.crop.y, 3), round(r.crop.z, 3)): r for r in records}
    for uid, x, y, z, label in rows:  # LPS on disk, RAS in the record
        record = by_centre[uid, round(-float(x), 3), round(-float(y), 3), round(float(z), 3)]
        assert record.labels == {"nodule": float(label)} and record.ndim == 3
        assert record.target == ("nodule" if label == "1" else "non-nodule")
        assert record.image_path.stem == uid and record.crop.size_mm == 48.0
    nodules = {(r.patient_id, round(p.x, 3), round(p.y, 3), round(p.z, 3))
               for r in load_dataset("luna16", root / "luna16").records for p in r.points}
    positives = {key for key, r in by_centre.items() if r.labels["nodule"] == 1.0}
    assert positives == nodules and len(positives) >= 1
    split_of = {}
    for r in records:  # every candidate of a series in the series' split
        assert split_of.setdefault(r.patient_id, r.split) == r.split
    keys = (tmp_path / "luna16-candidates.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(keys) == len(set(keys)) == len(records) and all("@" in k for k in keys)


def test_luna_candidates_come_from_the_v2_table_when_there_is_one(world, tmp_path):
    root, _ = world
    luna = tmp_path / "luna16"
    shutil.copytree(root / "luna16", luna)
    lines = (luna / "candidates.csv").read_text(encoding="utf-8").splitlines()
    (luna / "candidates_V2").mkdir()
    (luna / "candidates_V2" / "candidates_V2.csv").write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")
    assert len(load_dataset("luna16-candidates", luna).records) == 2 < len(lines) - 1


def test_false_candidates_are_the_largest_lung_structures_clear_of_every_nodule():
    from unimed.phantom.ct.writers import FALSE_CANDIDATES, false_candidates

    study = generate_ct_study(CTConfig(), 0, "luna16", 2, site="lidc_a", enrich={"nodule": 1.0})
    nodules = [lesion for lesion in study.lesions if lesion.name == "nodule"]
    found = false_candidates(study, FALSE_CANDIDATES)
    assert nodules and len(found) == FALSE_CANDIDATES
    spacing = np.array(study.spacing[::-1])
    for centre in found:
        k, j, i = (int(round(v)) for v in centre)
        assert -500 < study.hu[k, j, i] < 400  # soft tissue, not lung and not bone ...
        assert (study.hu[k, j - 6:j + 7, i - 6:i + 7] < -500).any()  # ... with lung beside it
        for lesion in nodules:
            assert np.linalg.norm((np.array(centre) - lesion.centre_voxel) * spacing) >= lesion.diameter_mm
    assert false_candidates(study, 2) == found[:2]  # the largest first


def test_crop_cube_centres_the_point_and_pads_outside_with_air():
    array = np.full((20, 20, 10), -800.0, np.float32)
    array[12, 5, 3] = 100.0
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    affine[:3, 3] = (-10.0, 4.0, 30.0)
    volume = Volume(array=array, affine=affine, path=Path("v.nii.gz"))
    point = affine @ np.array([12, 5, 3, 1.0])
    cube = crop_cube(volume, point[:3], 20.0)
    assert cube.array.shape == (11, 11, 5) and cube.array[5, 5, 2] == 100.0
    np.testing.assert_allclose(cube.affine @ np.array([5, 5, 2, 1.0]), point)
    corner = affine @ np.array([0, 0, 0, 1.0])
    edge = crop_cube(volume, corner[:3], 20.0)
    assert edge.array[5, 5, 2] == -800.0 and (edge.array[:5] == -1000.0).all() and (edge.array[:, :, :2] == -1000.0).all()
    with pytest.raises(DataError, match=r"v\.nii\.gz: crop centred at .* outside the volume"):
        crop_cube(volume, (500.0, 0.0, 0.0), 20.0)


@pytest.mark.parametrize(("row", "message"), [
    ("{uid},0.0,0.0,0.0,2", "class '2' must be 0 or 1"),
    ("{uid},5000.0,0.0,0.0,0", "candidate at .* outside the volume"),
    ("{first}", "repeats the candidate of line 2"),
    ("{uid},,0.0,0.0,0", r"candidate coordinates \(nan, 0\.0, 0\.0\) must be numbers"),
])
def test_bad_luna_candidate_rows_name_their_line(world, tmp_path, row, message):
    root, _ = world
    luna = tmp_path / "luna16"
    shutil.copytree(root / "luna16", luna)
    first = ",".join(_candidate_rows(luna)[0])
    with (luna / "candidates.csv").open("a", encoding="utf-8") as f:
        f.write(row.format(uid=first.split(",")[0], first=first) + "\n")
    lines = (luna / "candidates.csv").read_text(encoding="utf-8").count("\n")
    with pytest.raises(DataError, match=rf"candidates\.csv, line {lines}\b.*{message}"):
        load_dataset("luna16-candidates", luna)
    skipped = load_dataset("luna16-candidates", luna, on_error="skip")
    assert len(skipped.records) == lines - 2 and sum(skipped.dropped.values()) == 1


@pytest.mark.parametrize(("name", "table", "row"), [
    ("luna16", "annotations.csv", "1.2.{i},0.0,0.0,0.0,6.5"),
    ("luna16-candidates", "candidates.csv", "1.2.{i},0.0,0.0,0.0,1"),
])
def test_luna_rows_of_series_not_downloaded_are_left_out_and_counted(world, tmp_path, caplog, name, table,
                                                                     row):
    """LUNA16 comes as ten subset archives and its tables list the nodules and candidates of all
    of them: a folder holding some subsets reads their series, counts the other rows and says so;
    an annotations table none of whose rows names a series here is said (every volume reads
    nodule-free: a few such series copied, or another dataset's table), a candidates table so is
    an error (nothing to read)."""
    root, _ = world
    luna = tmp_path / "luna16"
    shutil.copytree(root / "luna16", luna)
    before = load_dataset(name, luna, split_dir=tmp_path / "before")
    with (luna / table).open("a", encoding="utf-8") as f:
        f.write("".join(row.format(i=i) + "\n" for i in (1, 2, 2)))
    with caplog.at_level(logging.WARNING):
        after = load_dataset(name, luna, split_dir=tmp_path / "after")
    assert [(r.image_path, r.labels, r.points, r.crop) for r in after.records] == [
        (r.image_path, r.labels, r.points, r.crop) for r in before.records]
    assert after.dropped == {**before.dropped, "series not here": 3}
    warned = [r.getMessage() for r in caplog.records if "partial download" in r.getMessage()]
    assert warned == [f"{name}: 3 row(s) left out, series not here (2, e.g. 1.2.1): a partial download?"]
    header = (luna / table).read_text(encoding="utf-8").splitlines()[0]
    (luna / table).write_text(header + "\n" + row.format(i=1) + "\n", encoding="utf-8")
    if name == "luna16-candidates":  # no candidate row is here: no record
        with pytest.raises(DataError, match=r"luna16: none of the 1 row\(s\) its tables list is here"):
            load_dataset(name, luna, split_dir=tmp_path / "none")
        return
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        none = load_dataset(name, luna, split_dir=tmp_path / "none")
    assert len(none.records) == len(before.records) and not any(r.points for r in none.records)
    assert any(f"{table}: none of its 1 row(s) names a series here" in r.getMessage() and
               "no volume has a nodule" in r.getMessage() for r in caplog.records)


def _volume_of(record) -> str:
    return record.image_path.stem


def test_candidate_negatives_keep_every_nodule_and_a_seeded_sample_per_series(world, tmp_path):
    root, _ = world
    luna = root / "luna16"
    full = load_dataset("luna16-candidates", luna, split_dir=tmp_path).records
    negatives = Counter(_volume_of(r) for r in full if r.labels["nodule"] == 0.0)
    assert max(negatives.values()) >= 3  # the phantom writes four false candidates per series
    kept = load_dataset("luna16-candidates", luna, split_dir=tmp_path, candidate_negatives=2).records
    key = lambda r: r.image_key(luna)  # noqa: E731
    by_key = {key(r): r for r in full}
    assert [key(r) for r in kept] == [key(r) for r in full if key(r) in {key(k) for k in kept}]  # order
    assert all(by_key[key(r)] == r for r in kept)  # same records, same splits
    assert {key(r) for r in kept if r.labels["nodule"] == 1.0} == {key(r) for r in full if r.labels["nodule"] == 1.0}
    kept_negatives = Counter(_volume_of(r) for r in kept if r.labels["nodule"] == 0.0)
    assert kept_negatives == {volume: min(n, 2) for volume, n in negatives.items()}
    again = load_dataset("luna16-candidates", luna, split_dir=tmp_path, candidate_negatives=2).records
    assert [key(r) for r in again] == [key(r) for r in kept]
    # A volume's sample depends on the seed and on that volume alone: other seeds draw others, and
    # a table without the other series (nor their rows) keeps the same candidates of this one.
    draws = {tuple(key(r) for r in load_dataset("luna16-candidates", luna, split_seed=seed,
                                                 candidate_negatives=1).records) for seed in range(4)}
    assert len(draws) > 1
    alone = tmp_path / "luna16"
    shutil.copytree(luna, alone)
    series = _volume_of(kept[0])
    lines = (alone / "candidates.csv").read_text(encoding="utf-8").splitlines()
    rows = [line for line in lines[1:] if line.startswith(series)]
    (alone / "candidates.csv").write_text("\n".join([lines[0], *rows[::-1]]) + "\n", encoding="utf-8")
    one = load_dataset("luna16-candidates", alone, candidate_negatives=2).records
    assert (sorted(r.image_key(alone) for r in one)
            == sorted(key(r) for r in kept if _volume_of(r) == series))
    # The per-series dataset has no candidates: nothing of it is sampled.
    assert len(load_dataset("luna16", luna, candidate_negatives=1).records) == TINY.ct.luna_studies
