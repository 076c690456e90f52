"""A dataset index: one `Record` per image (or DBT volume), read from a dataset folder in its
published layout by the readers of `training.datasets`, or planned from phantom seeds.

An index holds paths and labels only, never pixels: `training.streaming` reads each record
from disk when a batch asks for it, so memory does not grow with the dataset. Splits are by
patient (no patient's films in two splits), stratified by the record's label; `kfold` gives
the i-th of K folds for cross-validation.

Layouts (`--layout`):
- rsna: `stage_2_train_labels.csv` (+ `stage_2_detailed_class_info.csv`), DICOM in the folder
  or its `stage_2_train_images/`;
- siim: `train-rle.csv`, DICOM anywhere below the folder (patient from each file's PatientID);
- montgomery / shenzhen: `CXR_png/` with their masks; the film's tuberculosis label is the
  last digit of its name (MCUCXR_0001_0.png, CHNCXR_0001_1.png), the datasets' convention;
- duke: the BCS-DBT file-path, labels and boxes CSVs, volumes below the folder;
- folder: DICOM files + `labels.csv` (file, then one 0/1 column per label);
- cxrlt: a CXR-LT / MIMIC-CXR style CSV (`train.csv`: dicom_id, study_id, subject_id, an
  optional path, one 0/1 column per label) with DICOM, PNG or JPG images below the folder.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from cadnode.infer.phantoms.breast import VolumeCase
from cadnode.infer.phantoms.chest import Case
from training import datasets
from training.datasets import Box, DukeBox

ABNORMAL = "abnormal"
NO_FINDING = "No Finding"  # CXR-LT's normal label: abnormal = 1 - No Finding
CXRLT_LABELS = "train.csv"
CXRLT_META = ("dicom_id", "study_id", "subject_id", "path", "split", "fold")
IMAGE_SUFFIXES = (".dcm", ".png", ".jpg", ".jpeg")
LAYOUTS = ("rsna", "siim", "montgomery", "shenzhen", "duke", "folder", "cxrlt")


@dataclass(frozen=True)
class Record:
    """One image of a dataset: where it is and what it is labelled with."""

    key: str  # unique in the index: file stem, dicom_id, SOP Instance UID or Duke volume
    patient: str  # splits never separate a patient's images
    image: Path | None  # None: a phantom, rendered from `seed`
    labels: Mapping[str, float] = field(default_factory=dict)  # 0/1 per label; "abnormal"
    boxes: tuple[Box, ...] = ()  # RSNA opacities, source pixels
    masks: tuple[Path, ...] = ()  # Montgomery (left, right) or Shenzhen (both) PNGs
    rle: tuple[str, ...] = ()  # SIIM-ACR pneumothorax regions ("-1": none)
    view: str = ""  # Duke view, e.g. "lcc"
    lesions: tuple[DukeBox, ...] = ()  # Duke boxes of this volume
    seed: int | None = None  # phantom seed
    volume: VolumeCase | None = None  # a phantom DBT volume, rendered when sampled

    @property
    def abnormal(self) -> bool:
        return self.labels.get(ABNORMAL, 0.0) > 0.5

    @property
    def finding(self) -> str:
        """The positive labels besides "abnormal", joined by "+"; "normal" when none (the
        phantom cases' `finding`)."""
        shown = [
            k for k, v in sorted(self.labels.items()) if k not in (ABNORMAL, NO_FINDING) and v > 0.5
        ]
        if not shown and self.abnormal:
            return ABNORMAL
        return "+".join(shown) or "normal"

    @property
    def stratum(self) -> str:
        return self.finding


# --- phantoms --------------------------------------------------------------------------------


def chest_records(cases: Sequence[Case]) -> list[Record]:
    """Phantom films as an index: rendered (not read) when sampled."""
    return [
        Record(
            key=f"phantom-{case.seed}",
            patient=case.patient_id,
            image=None,
            labels={
                ABNORMAL: float(case.abnormal),
                "opacity": float(case.opacity),
                "pneumothorax": float(case.pneumothorax),
            },
            seed=case.seed,
        )
        for case in cases
    ]


def chest_case(record: Record) -> Case:
    """The phantom case a chest phantom record was planned from."""
    if record.seed is None:
        raise ValueError(f"{record.key} is not a phantom")
    labels = record.labels
    return Case(record.seed, labels["opacity"] > 0.5, labels["pneumothorax"] > 0.5)


def volume_records(cases: Sequence[VolumeCase]) -> list[Record]:
    """Phantom DBT volumes as an index keyed as the Duke CSVs name a volume (PatientID,
    StudyUID, View joined by "/"), labelled with their Duke group: rendered when sampled."""
    return [
        Record(
            key="/".join((case.patient_id, case.study_uid, case.view.lower())),
            patient=case.patient_id,
            image=None,
            labels={ABNORMAL: float(case.masses > 0), phantom_group(case): 1.0},
            view=case.view.lower(),
            seed=case.seed,
            volume=case,
        )
        for case in cases
    ]


def phantom_group(case: VolumeCase) -> str:
    """The Duke label group of a phantom volume (as phantom_sets writes BCS-DBT-labels.csv)."""
    return "normal" if not case.masses else "cancer" if case.cancer else "benign"


def volume_key(record: Record) -> datasets.VolumeKey:
    """(PatientID, StudyUID, View) of a DBT record, as the Duke CSVs name it."""
    patient, study, view = record.key.split("/")
    return patient, study, view


# --- dataset folders -------------------------------------------------------------------------


def index_folder(root: Path, layout: str, labels_csv: Path | None = None) -> list[Record]:
    """The records of a dataset folder in `layout`; ValueError naming the file on bad input."""
    if layout not in READERS:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    records = READERS[layout](root, labels_csv)
    if not records:
        raise ValueError(f"{root}: no {layout} records found")
    keys = [record.key for record in records]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{root}: the {layout} index names an image twice")
    return records


def _csv(root: Path, given: Path | None, default: str) -> Path:
    path = given or root / default
    if not path.is_file():
        raise ValueError(f"{path}: the labels CSV is missing")
    return path


def _rsna(root: Path, labels_csv: Path | None) -> list[Record]:
    images = root / "stage_2_train_images"
    classes = root / datasets.RSNA_CLASSES
    films = datasets.read_rsna(
        _csv(root, labels_csv, datasets.RSNA_LABELS),
        images if images.is_dir() else root,
        classes if classes.exists() else None,
    )
    return [
        Record(
            key=film.patient_id,
            patient=film.patient_id,
            image=_existing(film.path),
            labels={ABNORMAL: float(film.target), "opacity": float(film.target)},
            boxes=film.boxes,
        )
        for film in films
    ]


def _siim(root: Path, labels_csv: Path | None) -> list[Record]:
    films = datasets.read_siim(_csv(root, labels_csv, datasets.SIIM_LABELS), root)
    return [
        Record(
            key=film.image_id,
            patient=_patient_of(film.path),
            image=film.path,
            labels={ABNORMAL: float(film.positive), "pneumothorax": float(film.positive)},
            rle=film.encodings,
        )
        for film in films
    ]


def _lung_masks(reader: Callable[[Path], list[datasets.LungMaskFilm]]) -> Reader:
    def read(root: Path, labels_csv: Path | None) -> list[Record]:
        records = []
        for film in reader(root):
            tuberculosis = film.name.rsplit("_", 1)[-1]
            labels = {} if tuberculosis not in ("0", "1") else {ABNORMAL: float(tuberculosis)}
            if labels:
                labels["tuberculosis"] = labels[ABNORMAL]
            records.append(
                Record(film.name, film.name, film.image_path, labels, masks=film.mask_paths)
            )
        return records

    return read


def _duke(root: Path, labels_csv: Path | None) -> list[Record]:
    paths = datasets.read_duke_paths(root / datasets.DUKE_PATHS, root)
    groups = datasets.read_duke_labels(_csv(root, labels_csv, datasets.DUKE_LABELS))
    boxes_csv = root / datasets.DUKE_BOXES
    lesions: dict[datasets.VolumeKey, list[DukeBox]] = defaultdict(list)
    for box in datasets.read_duke_boxes(boxes_csv) if boxes_csv.exists() else []:
        lesions[box.volume].append(box)
    records = []
    for key, path in paths.items():
        group = groups.get(key)
        if group is None:
            raise ValueError(f"{datasets.DUKE_PATHS}: volume {'/'.join(key)} has no labels row")
        records.append(
            Record(
                key="/".join(key),
                patient=key[0],
                image=_existing(path),
                labels={ABNORMAL: float(bool(lesions.get(key))), group: 1.0},
                view=key[2],
                lesions=tuple(lesions.get(key, ())),
            )
        )
    return records


def _folder(root: Path, labels_csv: Path | None) -> list[Record]:
    files = datasets.read_labelled_folder(root, _csv(root, labels_csv, "labels.csv"))
    records = []
    for item in files:
        labels = dict(item.labels)
        if ABNORMAL not in labels:
            labels[ABNORMAL] = float(any(value > 0.5 for value in labels.values()))
        records.append(
            Record(str(item.path.relative_to(root)), _patient_of(item.path), item.path, labels)
        )
    return records


def _cxrlt(root: Path, labels_csv: Path | None) -> list[Record]:
    path = _csv(root, labels_csv, CXRLT_LABELS)
    rows = datasets.read_rows(path)
    datasets.require_columns(path, rows, ("dicom_id", "subject_id"))
    names = [key for key in (rows[0] if rows else {}) if key not in CXRLT_META]
    images = {} if rows and "path" in rows[0] else _images_by_stem(root)
    records = []
    for line, row in enumerate(rows, start=2):
        try:
            labels = {name: float(row[name] or 0) for name in names}
        except ValueError as error:
            raise ValueError(f"{path}:{line}: a label is not 0/1: {error}") from error
        image = root / row["path"] if row.get("path") else images.get(row["dicom_id"])
        if image is None or not image.exists():
            raise ValueError(f"{path}:{line}: no image for dicom_id {row['dicom_id']} below {root}")
        normal = labels.get(NO_FINDING)
        finding = any(v > 0.5 for k, v in labels.items() if k != NO_FINDING)
        labels[ABNORMAL] = float(finding if normal is None else normal < 0.5)
        records.append(Record(row["dicom_id"], row["subject_id"], image, labels))
    return records


def _images_by_stem(root: Path) -> dict[str, Path]:
    return {
        path.stem: path
        for path in sorted(root.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    }


def _patient_of(path: Path) -> str:
    """The file's PatientID (headers only), else its stem: a split must not separate them."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    return str(ds.get("PatientID", "")) or path.stem


def _existing(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"{path}: named by the labels but not on disk")
    return path


Reader = Callable[[Path, Path | None], list[Record]]
READERS: dict[str, Reader] = {
    "rsna": _rsna,
    "siim": _siim,
    "montgomery": _lung_masks(datasets.read_montgomery),
    "shenzhen": _lung_masks(datasets.read_shenzhen),
    "duke": _duke,
    "folder": _folder,
    "cxrlt": _cxrlt,
}


# --- splits ----------------------------------------------------------------------------------


def patient_groups(records: Sequence[Record]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        groups[record.patient].append(index)
    return dict(groups)


def fold_of_patients(records: Sequence[Record], folds: int, seed: int) -> dict[str, int]:
    """Each patient's fold in 0..folds-1, stratified: patients are ordered by their most
    telling stratum (the rarest among their records), shuffled within it, then dealt round
    robin, so every fold gets its share of each stratum and no patient is in two folds."""
    if folds < 2:
        raise ValueError("a split needs at least 2 folds")
    groups = patient_groups(records)
    if len(groups) < folds:
        raise ValueError(f"{len(groups)} patients cannot fill {folds} folds")
    frequency: dict[str, int] = defaultdict(int)
    for record in records:
        frequency[record.stratum] += 1
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for patient, members in groups.items():
        rarest = min((records[i].stratum for i in members), key=lambda s: (frequency[s], s))
        by_stratum[rarest].append(patient)
    rng = np.random.default_rng(seed)
    dealt: dict[str, int] = {}
    position = 0
    for stratum in sorted(by_stratum, key=lambda s: (frequency[s], s)):
        for patient in rng.permutation(sorted(by_stratum[stratum])):
            dealt[str(patient)] = position % folds
            position += 1
    return dealt


def split_records(
    records: Sequence[Record],
    *,
    validation: float,
    test: float,
    seed: int,
    folds: int | None = None,
    fold: int = 0,
) -> dict[str, list[Record]]:
    """train / validation / test by patient, stratified. With `folds` K: test is fold `fold`
    of K, validation the next fold, train the rest (K-fold cross-validation rotates `fold`);
    else the fractions, in twentieths (at least one patient per split)."""
    if folds is None:
        parts = 20
        test_parts = max(1, round(test * parts))
        validation_parts = max(1, round(validation * parts))
        if test_parts + validation_parts >= parts:
            raise ValueError("validation and test leave nothing to train on")
        assignment = fold_of_patients(records, parts, seed)
        test_folds = set(range(test_parts))
        validation_folds = set(range(test_parts, test_parts + validation_parts))
    else:
        if not 0 <= fold < folds:
            raise ValueError(f"--fold {fold} is not in 0..{folds - 1}")
        assignment = fold_of_patients(records, folds, seed)
        test_folds, validation_folds = {fold}, {(fold + 1) % folds}
    named: dict[str, list[Record]] = {"train": [], "validation": [], "test": []}
    for record in records:
        where = assignment[record.patient]
        name = (
            "test"
            if where in test_folds
            else "validation"
            if where in validation_folds
            else "train"
        )
        named[name].append(record)
    empty = [name for name, part in named.items() if not part]
    if empty:
        raise ValueError(f"too few patients: the {', '.join(empty)} split(s) came out empty")
    return named


def describe_records(layout: str, root: Path, splits: Mapping[str, Sequence[Record]]) -> str:
    """One sentence per split for the model card: counts, patients, findings."""
    parts = []
    for name, part in splits.items():
        counts: dict[str, int] = defaultdict(int)
        for record in part:
            counts[record.finding] += 1
        findings = ", ".join(f"{counts[key]} {key}" for key in sorted(counts))
        patients = len({record.patient for record in part})
        parts.append(f"{name}: {len(part)} images of {patients} patients ({findings}).")
    return (
        f"The {layout} dataset layout read from {root.name}/ (training.records), split by "
        "patient with stratification. " + " ".join(parts)
    )
