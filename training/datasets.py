"""The public datasets' own file formats, read and written, so a site's data plugs straight in.

- RSNA Pneumonia Detection (seed 000's data): `stage_2_train_labels.csv` (patientId, x, y,
  width, height, Target; one row per box, a normal film one row with empty box and Target 0),
  `stage_2_detailed_class_info.csv` (patientId, class), and `<patientId>.dcm` files.
- SIIM-ACR Pneumothorax (seed 001's data): `train-rle.csv` (ImageId, EncodedPixels; the
  competition's run-length encoding, `-1` for an empty mask, several rows for several
  regions; ImageId is the SOP Instance UID) and DICOM files anywhere below a folder.
- Montgomery County (seed 002's lung masks): `CXR_png/<name>.png` with
  `ManualMask/leftMask/<name>.png` and `ManualMask/rightMask/<name>.png` (the patient's left
  and right lung); Shenzhen: `CXR_png/<name>.png` with `mask/<name>_mask.png` (both lungs).
- Duke BCS-DBT (seed 003 A.8; views written lower case, "lcc", as the dataset does, and
  read in any case): boxes CSV (PatientID, StudyUID, View, Slice, X, Y, Width,
  Height, Class, VolumeSlices; other columns ignored), file-path CSV (PatientID, StudyUID,
  View, descriptive_path and/or classic_path), labels CSV (PatientID, StudyUID, View, Normal,
  Actionable, Benign, Cancer), multi-frame DICOM read as the authors' `dcmread_image` reads
  it: laterality from the stored pixels (their advice: the DICOM laterality tag is
  unreliable), flipped on both axes when it is not the view's (the boxes are drawn on the
  flipped image), rescaled and windowed from the functional groups.
- A generic DICOM folder with a labels CSV (file, then one column per label).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from cadnode.dicom.pixels import DEFAULT_LIMIT, decoded_pixels
from cadnode.infer.preprocess import Geometry, frames_to_tensor

# --- CSV helpers -------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, str]]:
    """CSV rows with header names and values stripped (SIIM's header reads ' EncodedPixels')."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        return [
            {key: value.strip() for key, value in zip(header, row, strict=False)}
            for row in reader
            if row
        ]


def require_columns(path: Path, rows: Sequence[dict[str, str]], columns: Iterable[str]) -> None:
    missing = [column for column in columns if rows and column not in rows[0]]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")


def write_rows(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


Box = tuple[float, float, float, float]  # x, y, width, height in source pixels


# --- RSNA Pneumonia Detection --------------------------------------------------------------------

RSNA_LABELS = "stage_2_train_labels.csv"
RSNA_CLASSES = "stage_2_detailed_class_info.csv"
RSNA_HEADER = ("patientId", "x", "y", "width", "height", "Target")


@dataclass(frozen=True)
class RsnaFilm:
    patient_id: str
    path: Path
    boxes: tuple[Box, ...]  # lung opacities
    target: int  # 1: lung opacity
    kind: str | None  # "Lung Opacity", "Normal", "No Lung Opacity / Not Normal" when known


def rsna_rows(patient_id: str, boxes: Sequence[Box]) -> list[list[object]]:
    """The label rows of one film: one per box, or one empty row with Target 0."""
    if not boxes:
        return [[patient_id, "", "", "", "", 0]]
    return [[patient_id, *box, 1] for box in boxes]


def read_rsna(labels_csv: Path, images: Path, classes_csv: Path | None = None) -> list[RsnaFilm]:
    """One film per patientId (rows grouped), with `<images>/<patientId>.dcm`."""
    rows = read_rows(labels_csv)
    require_columns(labels_csv, rows, RSNA_HEADER)
    kinds = {}
    if classes_csv is not None:
        kinds = {row["patientId"]: row["class"] for row in read_rows(classes_csv)}
    boxes: dict[str, list[Box]] = {}
    targets: dict[str, int] = {}
    for row in rows:
        patient = row["patientId"]
        boxes.setdefault(patient, [])
        targets[patient] = max(targets.get(patient, 0), int(float(row["Target"])))
        if row["Target"] not in ("0", "") and row["x"]:
            boxes[patient].append(tuple(float(row[k]) for k in ("x", "y", "width", "height")))  # type: ignore[arg-type]
    return [
        RsnaFilm(
            patient, images / f"{patient}.dcm", tuple(found), targets[patient], kinds.get(patient)
        )
        for patient, found in boxes.items()
    ]


# --- SIIM-ACR Pneumothorax ---------------------------------------------------------------------

SIIM_LABELS = "train-rle.csv"
SIIM_HEADER = ("ImageId", "EncodedPixels")
SIIM_EMPTY = "-1"


def rle_encode(mask: np.ndarray) -> str:
    """The SIIM-ACR encoding (the competition's mask_functions.mask2rle): pixels taken column
    by column (the image transposed, then row-major), pairs of (start, length) where each start
    counts from the end of the previous run. "-1" for an empty mask.
    """
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    if not flat.any():
        return SIIM_EMPTY
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    previous_ends = np.concatenate([[0], ends[:-1]])
    pairs = np.stack([starts - previous_ends, ends - starts], axis=1).reshape(-1)
    return " ".join(str(int(value)) for value in pairs)


def rle_decode(encoded: str, rows: int, columns: int) -> np.ndarray:
    """Inverse of `rle_encode` (mask_functions.rle2mask, transposed back): bool (rows, columns)."""
    flat = np.zeros(rows * columns, dtype=bool)
    text = encoded.strip()
    if text in (SIIM_EMPTY, ""):
        return flat.reshape(columns, rows).T
    values = np.array([int(v) for v in text.split()], dtype=np.int64)
    if len(values) % 2:
        raise ValueError("an RLE needs (start, length) pairs")
    position = 0
    for start, length in zip(values[0::2], values[1::2], strict=True):
        position += int(start)
        if position < 0 or position + int(length) > flat.size:
            raise ValueError(f"RLE run {start} {length} leaves a {rows}x{columns} image")
        flat[position : position + int(length)] = True
        position += int(length)
    return flat.reshape(columns, rows).T


@dataclass(frozen=True)
class SiimFilm:
    image_id: str  # the SOP Instance UID
    path: Path
    encodings: tuple[str, ...]  # one per region; ("-1",) when none

    def mask(self) -> np.ndarray:
        """The union of the film's regions at the film's own size."""
        ds = pydicom.dcmread(self.path, stop_before_pixels=True)
        masks = [rle_decode(code, int(ds.Rows), int(ds.Columns)) for code in self.encodings]
        return np.logical_or.reduce(masks)

    @property
    def positive(self) -> bool:
        return any(code != SIIM_EMPTY for code in self.encodings)


def read_siim(labels_csv: Path, images: Path) -> list[SiimFilm]:
    """Films of `train-rle.csv`, found below `images` by file stem or SOP Instance UID."""
    rows = read_rows(labels_csv)
    require_columns(labels_csv, rows, SIIM_HEADER)
    encodings: dict[str, list[str]] = {}
    for row in rows:
        encodings.setdefault(row["ImageId"], []).append(row["EncodedPixels"])
    paths = index_dicom(images, wanted=set(encodings))
    missing = sorted(set(encodings) - set(paths))
    if missing:
        raise ValueError(f"{labels_csv}: no DICOM file below {images} for {missing[:3]}")
    return [SiimFilm(key, paths[key], tuple(codes)) for key, codes in encodings.items()]


def index_dicom(folder: Path, wanted: set[str]) -> dict[str, Path]:
    """Files below `folder` by stem, and by SOP Instance UID for stems that are not wanted."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.dcm")):
        if path.stem in wanted:
            found[path.stem] = path
            continue
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).get("SOPInstanceUID", ""))
        if uid in wanted:
            found[uid] = path
    return found


# --- Montgomery / Shenzhen lung masks ----------------------------------------------------------


@dataclass(frozen=True)
class LungMaskFilm:
    name: str
    image_path: Path
    mask_paths: tuple[Path, ...]  # Montgomery: (left, right); Shenzhen: (both,)

    def image(self) -> np.ndarray:
        return np.asarray(Image.open(self.image_path).convert("F"), dtype=np.float32)

    def masks(self) -> list[np.ndarray]:
        """Each mask file as bool (any non-zero pixel is lung)."""
        return [np.asarray(Image.open(path).convert("L")) > 0 for path in self.mask_paths]

    def lungs(self) -> np.ndarray:
        return np.logical_or.reduce(self.masks())


def read_montgomery(root: Path) -> list[LungMaskFilm]:
    """`CXR_png/*.png` paired with `ManualMask/leftMask/` and `ManualMask/rightMask/`."""
    films = []
    for image in sorted((root / "CXR_png").glob("*.png")):
        left = root / "ManualMask" / "leftMask" / image.name
        right = root / "ManualMask" / "rightMask" / image.name
        if not (left.exists() and right.exists()):
            raise ValueError(f"{image}: no left and right mask under {root / 'ManualMask'}")
        films.append(LungMaskFilm(image.stem, image, (left, right)))
    return films


def read_shenzhen(root: Path) -> list[LungMaskFilm]:
    """`CXR_png/*.png` paired with `mask/<name>_mask.png`; images without a mask are skipped
    (the Shenzhen mask set covers most, not all, of the films)."""
    films = []
    for image in sorted((root / "CXR_png").glob("*.png")):
        mask = root / "mask" / f"{image.stem}_mask.png"
        if mask.exists():
            films.append(LungMaskFilm(image.stem, image, (mask,)))
    return films


def write_montgomery_masks(root: Path, name: str, left: np.ndarray, right: np.ndarray) -> None:
    for folder, mask in (("leftMask", left), ("rightMask", right)):
        path = root / "ManualMask" / folder / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)


# --- Duke BCS-DBT --------------------------------------------------------------------------------

DUKE_BOXES = "BCS-DBT-boxes.csv"
DUKE_PATHS = "BCS-DBT-file-paths.csv"
DUKE_LABELS = "BCS-DBT-labels.csv"
DUKE_BOX_HEADER = (
    "PatientID", "StudyUID", "View", "Slice", "X", "Y", "Width", "Height", "Class", "VolumeSlices"
)  # fmt: skip
DUKE_PATH_HEADER = ("PatientID", "StudyUID", "View", "descriptive_path", "classic_path")
DUKE_LABEL_HEADER = ("PatientID", "StudyUID", "View", "Normal", "Actionable", "Benign", "Cancer")
VolumeKey = tuple[str, str, str]  # PatientID, StudyUID, View


@dataclass(frozen=True)
class DukeBox:
    """A lesion: a rectangle on its central slice (columns of the Duke box CSV)."""

    patient_id: str
    study_uid: str
    view: str
    slice: int
    x: float
    y: float
    width: float
    height: float
    label: str = "benign"  # Duke's Class: benign or cancer
    volume_slices: int | None = None

    @property
    def volume(self) -> VolumeKey:
        return self.patient_id, self.study_uid, self.view

    def row(self) -> list[object]:
        slices = "" if self.volume_slices is None else self.volume_slices
        return [
            *self.volume,
            self.slice,
            self.x,
            self.y,
            self.width,
            self.height,
            self.label,
            slices,
        ]


def read_duke_boxes(path: Path) -> list[DukeBox]:
    rows = read_rows(path)
    require_columns(path, rows, DUKE_BOX_HEADER[:9])
    return [
        DukeBox(
            row["PatientID"],
            row["StudyUID"],
            row["View"].lower(),
            int(float(row["Slice"])),
            *(float(row[key]) for key in ("X", "Y", "Width", "Height")),
            row["Class"],
            int(float(row["VolumeSlices"])) if row.get("VolumeSlices") else None,
        )
        for row in rows
    ]


def write_duke_boxes(path: Path, boxes: Iterable[DukeBox]) -> None:
    write_rows(path, DUKE_BOX_HEADER, (box.row() for box in boxes))


def read_duke_paths(path: Path, root: Path) -> dict[VolumeKey, Path]:
    """Volume -> DICOM file; the classic path is preferred, else the descriptive one."""
    rows = read_rows(path)
    require_columns(path, rows, DUKE_PATH_HEADER[:3])
    volumes = {}
    for row in rows:
        relative = row.get("classic_path") or row.get("descriptive_path")
        if not relative:
            raise ValueError(f"{path}: a row without classic_path or descriptive_path")
        volumes[(row["PatientID"], row["StudyUID"], row["View"].lower())] = root / relative
    return volumes


def read_duke_labels(path: Path) -> dict[VolumeKey, str]:
    """Volume -> its group: normal, actionable, benign or cancer."""
    rows = read_rows(path)
    require_columns(path, rows, DUKE_LABEL_HEADER)
    groups = ("Normal", "Actionable", "Benign", "Cancer")
    return {
        (row["PatientID"], row["StudyUID"], row["View"].lower()): next(
            (group.lower() for group in reversed(groups) if row[group] == "1"), "normal"
        )
        for row in rows
    }


def image_laterality(frame: np.ndarray) -> str:
    """R when the right image edge holds more signal (the chest wall), else L (Duke's rule)."""
    return "R" if float(frame[:, 0].sum()) < float(frame[:, -1].sum()) else "L"


def duke_flip_needed(ds: pydicom.Dataset, view: str) -> bool:
    """Whether Duke's `dcmread_image` flips this volume: the laterality of its first frame's
    stored pixels (edge sums, before any rescale or window, as theirs) is not the view's."""
    first = decoded_pixels(ds, DEFAULT_LIMIT, frame=0)
    return image_laterality(first) != view[0].upper()


def duke_volume_tensor(ds: pydicom.Dataset, view: str, size: int) -> tuple[np.ndarray, Geometry]:
    """The one way a Duke-layout volume becomes model input (training, `cadnode-train detect`):
    `frames_to_tensor` (rescale, each frame's window, fitted to `size`), turned upside down
    and left-right (both axes, as Duke's `dcmread_image` does) when `duke_flip_needed`. Duke's
    boxes are drawn on that flipped image, so the returned geometry maps model pixels to it:
    boxes found through it are in the boxes' frame, ready for the Duke FROC."""
    tensors, geometry = frames_to_tensor(ds, size, limit=DEFAULT_LIMIT)
    if not duke_flip_needed(ds, view):
        return tensors, geometry
    content_rows = max(1, round(geometry.source_rows * geometry.scale))
    content_columns = max(1, round(geometry.source_columns * geometry.scale))
    mirrored = replace(
        geometry,
        pad_top=size - geometry.pad_top - content_rows,
        pad_left=size - geometry.pad_left - content_columns,
    )
    return np.ascontiguousarray(tensors[:, :, ::-1, ::-1]), mirrored


def read_duke_volume(path: Path, view: str) -> np.ndarray:
    """Float32 (slices, rows, columns) in [0, 1] at the stored size, in the frame Duke's boxes
    are drawn on: `duke_volume_tensor` at the volume's own size (rescaled, windowed with each
    frame's functional-group window, flipped when the pixels' laterality disagrees with the
    view's), its padding cropped off."""
    ds = pydicom.dcmread(path)
    rows, columns = int(ds.Rows), int(ds.Columns)
    tensors, geometry = duke_volume_tensor(ds, view, max(rows, columns))
    top, left = geometry.pad_top, geometry.pad_left
    return np.ascontiguousarray(tensors[:, 0, top : top + rows, left : left + columns])


# --- generic DICOM folder + labels CSV ----------------------------------------------------------


@dataclass(frozen=True)
class LabelledFile:
    path: Path
    labels: dict[str, float] = field(default_factory=dict)


def read_labelled_folder(folder: Path, labels_csv: Path) -> list[LabelledFile]:
    """`labels.csv`: a `file` column (relative to `folder`) and one numeric column per label."""
    rows = read_rows(labels_csv)
    require_columns(labels_csv, rows, ["file"])
    files = []
    for row in rows:
        path = folder / row["file"]
        if not path.exists():
            raise ValueError(f"{labels_csv}: {row['file']} is not in {folder}")
        labels = {key: float(value) for key, value in row.items() if key != "file"}
        files.append(LabelledFile(path, labels))
    return files


def iter_dicom(files: Iterable[Path]) -> Iterator[pydicom.Dataset]:
    for path in files:
        yield pydicom.dcmread(path)
