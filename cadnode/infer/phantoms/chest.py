"""Synthetic chest radiographs written as real DICOM.

They stand in for patient data in the demo engines, the tests and the benchmarks: lungs,
ribs, mediastinum, lung markings and quantum noise, with optional opacities and a
pneumothorax (an air crescent without lung markings behind a pleural line).
Everything is deterministic for a seed. `difficulty` (cadnode.infer.phantoms.difficulty) makes
the findings fainter, smaller and noisier and adds look-alikes; its default is the original look.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from cadnode.infer.phantoms.difficulty import EASY, Difficulty

PIXEL_SPACING_MM = 0.35 * 1024 / 512  # a 36 cm field on the default 512 grid


@dataclass
class ChestPhantom:
    pixels: np.ndarray  # uint16, bright = dense (MONOCHROME2)
    lung_mask: np.ndarray  # bool, both lungs
    pneumothorax_mask: np.ndarray  # bool, empty when absent
    opacity_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # x, y, w, h
    # Boxes (x, y, w, h) of the extra findings drawn (EXTRA_FINDINGS), by finding.
    finding_boxes: dict[str, list[tuple[int, int, int, int]]] = field(default_factory=dict)

    @property
    def abnormal(self) -> bool:
        return bool(self.opacity_boxes) or bool(self.pneumothorax_mask.any())

    # The films are displayed as a frontal film is read: the patient's right lung on the image
    # left. The lungs never cross the midline (centres 0.19-0.23 of the width from it, radii at
    # most 0.16), so the image halves split them.
    @property
    def right_lung_mask(self) -> np.ndarray:
        mask = self.lung_mask.copy()
        mask[:, mask.shape[1] // 2 :] = False
        return mask

    @property
    def left_lung_mask(self) -> np.ndarray:
        mask = self.lung_mask.copy()
        mask[:, : mask.shape[1] // 2] = False
        return mask


def make_chest_phantom(
    seed: int,
    *,
    size: int = 512,
    opacity: bool = False,
    pneumothorax: bool = False,
    extra: Sequence[str] = (),
    difficulty: Difficulty = EASY,
) -> ChestPhantom:
    """`extra`: findings of EXTRA_FINDINGS to draw too (the multi-label findings set)."""
    rng = np.random.default_rng(seed)
    knob = np.random.default_rng([seed, 5])  # the difficulty's own draws: `rng` stays as it was
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size

    body = _ellipse(x, y, 0.5, 0.55, 0.46 + rng.uniform(-0.02, 0.02), 0.55)
    lungs = np.zeros_like(body, dtype=bool)
    lung_centres = []
    for side in (-1, 1):
        cx = 0.5 + side * rng.uniform(0.19, 0.23)
        cy = rng.uniform(0.45, 0.5)
        rx, ry = rng.uniform(0.13, 0.16), rng.uniform(0.27, 0.31)
        lungs |= _ellipse(x, y, cx, cy, rx, ry)
        lung_centres.append((cx, cy, rx, ry))

    density = 0.25 * body + 0.35 * body * ~lungs
    density += 0.25 * _ellipse(x, y, 0.52, 0.62, 0.12, 0.14)  # heart and mediastinum
    density += _ribs(x, y, rng) * body
    density += 0.04 * _smooth_noise(rng, size, scale=24) * lungs  # lung markings

    ptx_mask = np.zeros_like(lungs)
    if pneumothorax:
        cx, cy, rx, ry = lung_centres[int(rng.integers(2))]
        side = 1 if cx > 0.5 else -1
        # The collapsed lung's radii as shares of the lung's: a smaller `size` collapses it
        # less (a thinner crescent). Offsets from 0.7 and 0.85 so that size 1 gives exactly those.
        less = 1.0 - difficulty.size
        collapsed_x, collapsed_y = 0.7 + 0.3 * less, 0.85 + 0.15 * less
        centre = cx - side * rx * 0.25, cy + ry * 0.1
        collapsed = _ellipse(x, y, *centre, rx * collapsed_x, ry * collapsed_y)
        ptx_mask = _ellipse(x, y, cx, cy, rx, ry) & ~collapsed
        # Air: no markings, darker; a fainter one keeps part of the lung's density.
        air = min(1.0, difficulty.contrast_factor(knob))
        density = np.where(ptx_mask, (1.0 - air) * density + air * 0.12 * body, density)
        # The visceral pleural line: the collapsed lung's rim, 0.02 of the lung's radius thick.
        inner = _ellipse(x, y, *centre, rx * (0.68 + 0.3 * less), ry * (0.83 + 0.15 * less))
        density += 0.12 * air * (collapsed & ~inner & _ellipse(x, y, cx, cy, rx, ry))

    boxes: list[tuple[int, int, int, int]] = []
    if opacity:
        for _ in range(int(rng.integers(1, 3))):
            cx, cy, rx, ry = lung_centres[int(rng.integers(2))]
            ox, oy = cx + rng.uniform(-0.5, 0.5) * rx, cy + rng.uniform(-0.5, 0.5) * ry
            radius = rng.uniform(0.03, 0.07) * difficulty.size
            amplitude = 0.35 * difficulty.contrast_factor(knob)
            density += amplitude * _blob(x, y, ox, oy, radius) * lungs
            half = int(2 * radius * size)
            boxes.append((int(ox * size) - half, int(oy * size) - half, 2 * half, 2 * half))

    found: dict[str, list[tuple[int, int, int, int]]] = {}
    if extra:
        found = _draw_extra(density, x, y, lung_centres, set(extra), seed)
    for _ in range(difficulty.confounder_count(knob)):
        _draw_look_alike(density, x, y, lungs, lung_centres, knob, difficulty)
    density += rng.normal(0, 0.015 * difficulty.noise, density.shape)
    pixels = np.clip(density / max(float(density.max()), 1e-6), 0, 1) * 4000
    return ChestPhantom(pixels.astype(np.uint16), lungs, ptx_mask, boxes, found)


def _blob(x: np.ndarray, y: np.ndarray, ox: float, oy: float, radius: float) -> np.ndarray:
    """A round density, 1 at its centre (an opacity, or a vessel seen end on)."""
    return np.exp(-((x - ox) ** 2 + (y - oy) ** 2) / (2 * radius**2))


def _draw_look_alike(
    density: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    lungs: np.ndarray,
    lung_centres: list[tuple[float, float, float, float]],
    knob: np.random.Generator,
    difficulty: Difficulty,
) -> None:
    """One normal structure that looks like a finding, into `density` in place: a vessel seen
    end on (a small round density, like a small opacity) or a skin fold (a curved line across
    the lung's outer part, like a pneumothorax's pleural line, but with markings beyond it)."""
    cx, cy, rx, ry = lung_centres[int(knob.integers(2))]
    amplitude = difficulty.contrast_factor(knob)
    if knob.random() < 0.6:
        ox, oy = cx + knob.uniform(-0.6, 0.6) * rx, cy + knob.uniform(-0.6, 0.6) * ry
        radius = knob.uniform(0.015, 0.05) * difficulty.size  # as large as small opacities
        density += 0.35 * amplitude * _blob(x, y, ox, oy, radius) * lungs
        return
    side = 1 if cx > 0.5 else -1
    scale = knob.uniform(0.65, 0.9)
    centre_x, centre_y = cx - side * rx * 0.25, cy + ry * 0.1
    outer = _ellipse(x, y, centre_x, centre_y, rx * scale, ry * (scale + 1) / 2)
    inner = _ellipse(x, y, centre_x, centre_y, rx * (scale - 0.02), ry * ((scale + 1) / 2 - 0.02))
    density += 0.12 * amplitude * (outer & ~inner & lungs)


EFFUSION, CARDIOMEGALY, NODULE = "effusion", "cardiomegaly", "nodule"
EXTRA_FINDINGS = (EFFUSION, CARDIOMEGALY, NODULE)


def _draw_extra(
    density: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    lung_centres: list[tuple[float, float, float, float]],
    kinds: set[str],
    seed: int,
) -> dict[str, list[tuple[int, int, int, int]]]:
    """Add the `kinds` to `density` in place; their boxes. Drawn from a generator of their
    own, so a film without extra findings is the same film it always was."""
    unknown = kinds - set(EXTRA_FINDINGS)
    if unknown:
        raise ValueError(f"unknown phantom finding(s) {sorted(unknown)}; one of {EXTRA_FINDINGS}")
    rng = np.random.default_rng([seed, 4])
    found: dict[str, list[tuple[int, int, int, int]]] = {}

    def box(region: np.ndarray) -> tuple[int, int, int, int]:
        rows, columns = np.nonzero(region)
        top, left = int(rows.min()), int(columns.min())
        return left, top, int(columns.max()) - left + 1, int(rows.max()) - top + 1

    if CARDIOMEGALY in kinds:  # a heart far wider than the normal 0.12 half-width
        heart = _ellipse(x, y, 0.53, 0.64, rng.uniform(0.19, 0.23), rng.uniform(0.16, 0.19))
        density += 0.25 * heart
        found[CARDIOMEGALY] = [box(heart)]
    if EFFUSION in kinds:  # fluid filling the base of one lung up to a meniscus
        cx, cy, rx, ry = lung_centres[int(rng.integers(2))]
        level = cy + ry * rng.uniform(0.35, 0.6)
        meniscus = level - 0.08 * np.abs(x - cx) / rx  # climbs towards the chest wall
        fluid = _ellipse(x, y, cx, cy, rx, ry) & (y >= meniscus)
        density += 0.3 * fluid
        found[EFFUSION] = [box(fluid)]
    if NODULE in kinds:  # one small round dense spot inside a lung
        cx, cy, rx, ry = lung_centres[int(rng.integers(2))]
        ox, oy = cx + rng.uniform(-0.5, 0.5) * rx, cy + rng.uniform(-0.6, 0.3) * ry
        radius = rng.uniform(0.015, 0.025)
        spot = _ellipse(x, y, ox, oy, radius, radius)  # its centre is inside the lung
        density += 0.3 * spot
        found[NODULE] = [box(spot)]
    return found


def chest_dataset(
    phantom: ChestPhantom,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str | None = None,
    seed: int = 0,
    view: str = "PA",
    body_part: str = "CHEST",
    modality: str = "DX",
) -> Dataset:
    """A Digital X-Ray (for presentation) dataset holding the phantom, with file meta."""
    uid = uid_factory(f"{patient_id}/{seed}")
    ds = Dataset()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = uid("instance")
    ds.StudyInstanceUID = study_uid or uid("study")
    ds.SeriesInstanceUID = uid(f"series/{ds.StudyInstanceUID}")
    now = dt.datetime(2026, 1, 1, 8, 0, 0) + dt.timedelta(seconds=seed)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = f"ACC{seed:08d}"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "cadnode synthetic phantom"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"] if view == "AP" else ["R", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = "U"
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.ImagerPixelSpacing = [PIXEL_SPACING_MM * 512 / phantom.pixels.shape[0]] * 2
    ds.DetectorType = "DIRECT"
    ds.PresentationLUTShape = "IDENTITY"
    ds.PositionerType = ""
    ds.AcquisitionContextSequence = []
    ds.AnatomicRegionSequence = [coded("51185008", "SCT", "Thorax")]
    ds.ViewCodeSequence = [coded(*VIEW_CODES.get(view, VIEW_CODES["PA"]))]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = phantom.pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2000
    ds.WindowWidth = 4000
    ds.LossyImageCompression = "00"
    ds.PixelData = phantom.pixels.tobytes()

    return with_file_meta(ds)


def with_file_meta(ds: Dataset) -> Dataset:
    """Give a phantom dataset the File Meta Information of an explicit little endian file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def write_chest_radiograph(
    path: Path,
    *,
    seed: int,
    patient_id: str = "PHANTOM",
    patient_name: str = "Phantom^Chest",
    opacity: bool = False,
    pneumothorax: bool = False,
    view: str = "PA",
    body_part: str = "CHEST",
    size: int = 512,
    difficulty: Difficulty = EASY,
) -> Dataset:
    """Make one phantom film and write it as a DICOM file; returns the dataset written."""
    phantom = make_chest_phantom(
        seed, size=size, opacity=opacity, pneumothorax=pneumothorax, difficulty=difficulty
    )
    ds = chest_dataset(
        phantom,
        patient_id=patient_id,
        patient_name=patient_name,
        seed=seed,
        view=view,
        body_part=body_part,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


VIEW_CODES = {
    "PA": ("399348003", "SCT", "postero-anterior"),
    "AP": ("399182002", "SCT", "antero-posterior"),
    "LL": ("399198007", "SCT", "left lateral"),
}


def coded(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def uid_factory(key: str):  # type: ignore[no-untyped-def]
    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["cadnode-phantom", key, kind])

    return uid


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float
) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _ribs(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ribs = np.zeros_like(x)
    for level in np.linspace(0.22, 0.78, 9) + rng.uniform(-0.01, 0.01):
        curve = level + 0.12 * (x - 0.5) ** 2 * 4 - 0.05
        ribs += 0.08 * (np.abs(y - curve) < 0.012)
    return ribs


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.normal(0, 1, (size // scale + 2, size // scale + 2)).astype(np.float32)
    fine = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(fine, dtype=np.float32)


# --- planned phantom sets -------------------------------------------------------------------

# Abnormal films rotate through these (opacity, pneumothorax) findings so that each kind,
# alone and together, is represented in every split.
FINDINGS: tuple[tuple[bool, bool], ...] = ((True, False), (False, True), (True, True))


@dataclass(frozen=True)
class Case:
    """One phantom film: its seed and which findings it carries."""

    seed: int
    opacity: bool
    pneumothorax: bool

    @property
    def abnormal(self) -> bool:
        return self.opacity or self.pneumothorax

    @property
    def finding(self) -> str:
        """One of normal, opacity, pneumothorax, opacity+pneumothorax (for counts and metrics)."""
        present = [("opacity", self.opacity), ("pneumothorax", self.pneumothorax)]
        return "+".join(name for name, shown in present if shown) or "normal"

    @property
    def patient_id(self) -> str:
        return f"PHANTOM{self.seed:08d}"


def plan_cases(seeds: range, positive_fraction: float) -> list[Case]:
    """Which seeds are abnormal (chosen at random, reproducibly) and with which findings."""
    count = len(seeds)
    rng = np.random.default_rng(seeds.start)
    abnormal = np.zeros(count, dtype=bool)
    abnormal[rng.permutation(count)[: round(count * positive_fraction)]] = True
    findings = cycle(FINDINGS)
    return [
        Case(seed, *next(findings)) if is_abnormal else Case(seed, False, False)
        for seed, is_abnormal in zip(seeds, abnormal, strict=True)
    ]


def render(case: Case, phantom_size: int, difficulty: Difficulty = EASY) -> Dataset:
    """The DICOM dataset of a case, built in memory exactly as it would be written to disk."""
    return render_with_phantom(case, phantom_size, difficulty)[0]


def render_with_phantom(
    case: Case, phantom_size: int, difficulty: Difficulty = EASY
) -> tuple[Dataset, ChestPhantom]:
    """The dataset and the phantom it holds (its masks and boxes are the truth)."""
    phantom = make_chest_phantom(
        case.seed,
        size=phantom_size,
        opacity=case.opacity,
        pneumothorax=case.pneumothorax,
        difficulty=difficulty,
    )
    ds = chest_dataset(
        phantom, patient_id=case.patient_id, patient_name="Phantom^Chest", seed=case.seed
    )
    return ds, phantom
