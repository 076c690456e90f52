"""Phantom datasets on disk, labelled in the real datasets' own formats.

Chest (`cadnode-train phantoms --kind cxr`): `cxr-NNNNN.dcm` films with
- `labels.csv` (file, abnormal, opacity, pneumothorax): the generic folder + labels CSV;
- RSNA Pneumonia Detection: `stage_2_train_labels.csv` and `stage_2_detailed_class_info.csv`,
  patientId = the file's stem (RSNA names each file `<patientId>.dcm`);
- SIIM-ACR Pneumothorax: `train-rle.csv`, ImageId = SOP Instance UID, `-1` when empty;
- Montgomery-style lung masks: `ManualMask/leftMask/` and `ManualMask/rightMask/` PNGs;
- CXR-LT / MIMIC-CXR style `train.csv` (dicom_id = the file's stem, subject_id, study_id, one
  0/1 column per label: Lung Opacity, Pneumothorax, No Finding);
- `montgomery/` and `shenzhen/`: each a folder in that dataset's own layout, the films as
  8-bit PNGs in `CXR_png/` named `<name>_<abnormal>.png` (the datasets' label digit) with
  left/right masks (Montgomery) or one both-lungs `mask/<name>_mask.png` (Shenzhen).
DBT (`--kind dbt`): `dbt-NNNNN.dcm` Breast Tomosynthesis volumes, 4 views per study (sharing
the study's UID, patient, Accession Number and Study Date/Time), with the Duke BCS-DBT boxes,
file-path and labels CSVs. With `flip_right`, right views are stored turned 180 degrees (the
chest wall on the left edge) while their boxes stay in the breast's own frame: a volume Duke's
`dcmread_image` must flip before its boxes fit, as some real ones do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset
from tqdm import tqdm

from cadnode.infer.phantoms.breast import plan_volumes, render_volume
from cadnode.infer.phantoms.chest import (
    ChestPhantom,
    chest_dataset,
    make_chest_phantom,
    plan_cases,
)
from cadnode.infer.phantoms.difficulty import EASY, Difficulty
from training import datasets
from training.datasets import DukeBox
from training.records import CXRLT_LABELS

LABELS_CSV = "labels.csv"
CXRLT_HEADER = ("dicom_id", "subject_id", "study_id", "Lung Opacity", "Pneumothorax", "No Finding")


def write_chest_set(
    out: Path,
    *,
    count: int,
    first_seed: int,
    positive_fraction: float,
    size: int,
    difficulty: Difficulty = EASY,
) -> int:
    cases = plan_cases(range(first_seed, first_seed + count), positive_fraction)
    labels, rsna, classes, siim, cxrlt = [], [], [], [], []
    for index, case in enumerate(tqdm(cases, desc="phantoms", unit="film")):
        name = f"cxr-{index:05d}"
        phantom = make_chest_phantom(
            case.seed,
            size=size,
            opacity=case.opacity,
            pneumothorax=case.pneumothorax,
            difficulty=difficulty,
        )
        ds = chest_dataset(
            phantom, patient_id=case.patient_id, patient_name="Phantom^Chest", seed=case.seed
        )
        out.mkdir(parents=True, exist_ok=True)
        ds.save_as(out / f"{name}.dcm", enforce_file_format=True)
        labels.append(
            [f"{name}.dcm", *(int(v) for v in (case.abnormal, case.opacity, case.pneumothorax))]
        )
        rsna += datasets.rsna_rows(name, phantom.opacity_boxes)
        kind = (
            "Lung Opacity"
            if case.opacity
            else "No Lung Opacity / Not Normal"
            if case.abnormal
            else "Normal"
        )
        classes.append([name, kind])
        siim.append([ds.SOPInstanceUID, datasets.rle_encode(phantom.pneumothorax_mask)])
        datasets.write_montgomery_masks(out, name, phantom.left_lung_mask, phantom.right_lung_mask)
        write_lung_mask_films(out, f"{name}_{int(case.abnormal)}", phantom)
        cxrlt.append(
            [
                name,
                case.patient_id,
                ds.StudyInstanceUID,
                *(int(v) for v in (case.opacity, case.pneumothorax, not case.abnormal)),
            ]
        )
    datasets.write_rows(out / LABELS_CSV, ["file", "abnormal", "opacity", "pneumothorax"], labels)
    datasets.write_rows(out / datasets.RSNA_LABELS, datasets.RSNA_HEADER, rsna)
    datasets.write_rows(out / datasets.RSNA_CLASSES, ["patientId", "class"], classes)
    datasets.write_rows(out / datasets.SIIM_LABELS, datasets.SIIM_HEADER, siim)
    datasets.write_rows(out / CXRLT_LABELS, CXRLT_HEADER, cxrlt)
    return len(cases)


def write_lung_mask_films(out: Path, name: str, phantom: ChestPhantom) -> None:
    """The film as an 8-bit PNG in a Montgomery and a Shenzhen layout folder, with masks."""
    pixels = phantom.pixels.astype(np.float64)
    span = max(float(pixels.max() - pixels.min()), 1.0)
    film = Image.fromarray(np.rint((pixels - pixels.min()) / span * 255).astype(np.uint8))
    for layout in ("montgomery", "shenzhen"):
        (out / layout / "CXR_png").mkdir(parents=True, exist_ok=True)
        film.save(out / layout / "CXR_png" / f"{name}.png")
    datasets.write_montgomery_masks(
        out / "montgomery", name, phantom.left_lung_mask, phantom.right_lung_mask
    )
    (out / "shenzhen" / "mask").mkdir(parents=True, exist_ok=True)
    both = np.where(phantom.lung_mask, 255, 0).astype(np.uint8)
    Image.fromarray(both).save(out / "shenzhen" / "mask" / f"{name}_mask.png")


def write_dbt_set(
    out: Path,
    *,
    count: int,
    first_seed: int,
    positive_fraction: float,
    slices: int,
    size: int,
    flip_right: bool = False,
    rescale: tuple[float, float] = (1.0, 0.0),
    difficulty: Difficulty = EASY,
) -> int:
    """The volumes and Duke CSVs; `flip_right` and `rescale` (slope, intercept) change only
    how the pixels are stored (`store_pixels`), never the boxes or what a reader should see."""
    cases = plan_volumes(range(first_seed, first_seed + count), positive_fraction)
    boxes: list[DukeBox] = []
    paths, labels = [], []
    for index, case in enumerate(tqdm(cases, desc="phantoms", unit="volume")):
        name = f"dbt-{index:05d}.dcm"
        ds, phantom = render_volume(case, slices=slices, size=size, difficulty=difficulty)
        store_pixels(ds, phantom.volume, turned=flip_right and case.view[0] == "R", rescale=rescale)
        out.mkdir(parents=True, exist_ok=True)
        ds.save_as(out / name, enforce_file_format=True)
        key = (case.patient_id, case.study_uid, case.view.lower())
        label = "cancer" if case.cancer else "benign"
        boxes += [
            DukeBox(*key, m.slice, m.x, m.y, m.width, m.height, label, slices)
            for m in phantom.masses
        ]
        paths.append([*key, name, name])  # one folder: both layouts point at the file
        found = bool(phantom.masses)
        labels.append(
            [*key, int(not found), 0, int(found and not case.cancer), int(found and case.cancer)]
        )
    datasets.write_duke_boxes(out / datasets.DUKE_BOXES, boxes)
    datasets.write_rows(out / datasets.DUKE_PATHS, datasets.DUKE_PATH_HEADER, paths)
    datasets.write_rows(out / datasets.DUKE_LABELS, datasets.DUKE_LABEL_HEADER, labels)
    return len(cases)


def store_pixels(
    ds: Dataset, volume: np.ndarray, *, turned: bool, rescale: tuple[float, float]
) -> None:
    """Store `volume` (the values a reader should get back after Rescale Slope/Intercept) as
    (value - intercept) / slope under the functional groups' rescale, turned 180 degrees in
    plane when `turned` (its laterality then reads the other way from the pixels)."""
    slope, intercept = rescale
    stored = np.rint((volume.astype(np.float64) - intercept) / slope)
    if stored.min() < 0 or stored.max() >= 2 ** int(ds.BitsStored):
        raise ValueError(f"rescale {rescale} leaves the stored {ds.BitsStored}-bit range")
    if turned:
        stored = stored[:, ::-1, ::-1]
    transformation = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    transformation.RescaleSlope, transformation.RescaleIntercept = slope, intercept
    ds.PixelData = np.ascontiguousarray(stored.astype(np.uint16)).tobytes()
