"""BCV (Multi-Atlas Labeling Beyond the Cranial Vault, abdomen): `img/img<NNNN>.nii.gz` volumes with
`label/label<NNNN>.nii.gz` organ label maps (1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder,
5 esophagus, 6 liver, 7 stomach, 8 aorta, 9 inferior vena cava, 10 portal and splenic vein,
11 pancreas, 12 right adrenal, 13 left adrenal)."""

from __future__ import annotations

from pathlib import Path

from unimed.data.adapters.base import ADAPTERS, AdapterResult, ReadContext
from unimed.data.adapters.volume_common import CARVE, POOL, check_volume_path
from unimed.data.errors import MISSING_IMAGE, DataError
from unimed.data.records import Record
from unimed.data.volumes import read_volume

BCV_ORGANS: dict[int, str] = {
    1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
    7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_splenic_vein", 11: "pancreas",
    12: "right_adrenal", 13: "left_adrenal",
}


TRAINING_FOLDERS = (".", "Training", "RawData/Training")
"""Where the labelled volumes' `img/` and `label/` are looked for, the first holding volumes: the
dataset folder, or below it as BCV's RawData.zip unpacks (RawData/Training; RawData/Testing has no
label maps)."""


@ADAPTERS.register("bcv")
def read_bcv(root: Path, ctx: ReadContext) -> AdapterResult:
    """One 3D record per `img/img<NNNN>.nii.gz` (in the first of TRAINING_FOLDERS that holds one) with
    its label map in `mask_path`; carved per patient (one patient per number). With check_images
    the label map is read too (a truncated one passed `unimed check-data` and stopped the
    segmentation)."""
    images = next((found for place in TRAINING_FOLDERS
                   if (found := sorted((root / place / "img").glob("img*.nii.gz")))), [])
    if not images:
        raise DataError(f"no img/img*.nii.gz volumes (looked in {', '.join(TRAINING_FOLDERS)})", root,
                        reason=MISSING_IMAGE)
    folder = images[0].parent.parent  # the folder of img/ and label/
    records = []
    for image in images:
        number = image.name[len("img"):-len(".nii.gz")]
        label = folder / "label" / f"label{number}.nii.gz"
        try:
            if not label.is_file():
                raise DataError(f"label map {label.relative_to(folder)} missing for this volume", image,
                                reason=MISSING_IMAGE)
            check_volume_path(ctx, image, image, None)
            if ctx.check_images:
                read_volume(label, labels=True)
        except DataError as err:
            ctx.drops.bad(err)
            continue
        records.append(Record(dataset=ctx.dataset, image_path=image, patient_id=number, study_id=number,
                              split=POOL, mask_path=label, ndim=3))
    return AdapterResult(records, CARVE)
