"""Synthetic digital breast tomosynthesis (DBT) volumes written as real multi-frame DICOM.

A volume is a stack of reconstructed slices: a breast attached to the chest wall at one image
edge, fibroglandular texture that changes from slice to slice, and optional masses, 3D blobs
in focus on one slice and blurred over a few neighbours (DBT's poor depth resolution). Each
volume is written as a Breast Tomosynthesis Image (enhanced multi-frame: shared and per-frame
functional groups, the display window in the Frame VOI LUT group), the way the Duke BCS-DBT
dataset stores it (seed 003 A.8: window read from the functional groups, (5200,9229) ->
(0028,9132) -> (0028,1050/1051)). Boxes follow the Duke box CSV: one 2D rectangle on the
central slice of each lesion. Everything is deterministic for a seed. `difficulty`
(cadnode.infer.phantoms.difficulty) makes masses fainter, smaller and noisier and adds dense
glandular blobs and calcification-like dots; its default is the original look.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.uid import (
    BreastTomosynthesisImageStorage,
)

from cadnode.infer.phantoms.chest import coded, uid_factory, with_file_meta
from cadnode.infer.phantoms.difficulty import EASY, Difficulty

VIEWS = ("LCC", "RCC", "LMLO", "RMLO")
VIEW_CODES = {
    "CC": ("399162004", "SCT", "cranio-caudal"),
    "MLO": ("399368009", "SCT", "medio-lateral oblique"),
}
PIXEL_SPACING_MM = 0.5  # in-plane; real DBT is ~0.1 mm, these volumes are small on purpose
SLICE_SPACING_MM = 1.0
MAX_VALUE = 4000  # stored values use 12 bits
IMAGE_TYPE = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
WINDOW = (2000.0, 4000.0)  # centre, width: the whole stored range
PHANTOM_EPOCH = dt.datetime(2026, 1, 1, 8, 0, 0)  # a phantom's times count seconds from here


@dataclass(frozen=True)
class Mass:
    """One lesion: its central slice and its box there (Duke: X, Y, Width, Height)."""

    slice: int
    x: int
    y: int
    width: int
    height: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.width / 2, self.y + self.height / 2


@dataclass
class BreastPhantom:
    volume: np.ndarray  # uint16 (slices, rows, columns), bright = dense (MONOCHROME2)
    breast_mask: np.ndarray  # bool (rows, columns): the breast footprint, same on every slice
    view: str  # LCC, RCC, LMLO or RMLO
    masses: list[Mass] = field(default_factory=list)

    @property
    def laterality(self) -> str:
        return self.view[0]


def make_breast_phantom(
    seed: int,
    *,
    slices: int = 16,
    size: int = 128,
    view: str = "LCC",
    masses: int = 0,
    difficulty: Difficulty = EASY,
) -> BreastPhantom:
    """A (slices, size, size) volume with `masses` lesions (each in the breast, apart)."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, not {view!r}")
    rng = np.random.default_rng(seed)
    knob = np.random.default_rng([seed, 5])  # the difficulty's own draws: `rng` stays as it was
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # The chest wall is at the right image edge for a right breast and at the left for a left
    # one, which is how the Duke authors tell laterality from the pixels (edge sums).
    depth = (1.0 - x) if view[0] == "R" else x
    reach = rng.uniform(0.7, 0.85)
    half_height = rng.uniform(0.36, 0.44)
    centre_y = 0.5 + rng.uniform(-0.04, 0.04)
    breast = (depth / reach) ** 2 + ((y - centre_y) / half_height) ** 2 <= 1.0
    # Compressed breast: nearly uniform thickness, thinning towards the skin line.
    thickness = np.sqrt(
        np.clip(1.0 - (depth / reach) ** 2 - ((y - centre_y) / half_height) ** 2, 0, 1)
    )
    fat = 0.30 * breast * (0.6 + 0.4 * thickness)
    glandular = _texture(rng, slices, size) * breast * (1.0 - 0.6 * depth / reach)

    volume = fat[None] + 0.2 * np.clip(glandular, 0, None)
    placed: list[Mass] = []
    for _ in range(masses):
        _add_mass(volume, rng, breast, placed, knob, difficulty)
    for _ in range(difficulty.confounder_count(knob)):
        _add_look_alike(volume, knob, breast, placed, difficulty)
    volume += rng.normal(0, 0.012 * difficulty.noise, volume.shape).astype(np.float32)
    pixels = np.clip(volume, 0, 1) * MAX_VALUE
    return BreastPhantom(pixels.astype(np.uint16), breast, view, placed)


def _add_mass(
    volume: np.ndarray,
    rng: np.random.Generator,
    breast: np.ndarray,
    placed: list[Mass],
    knob: np.random.Generator,
    difficulty: Difficulty,
) -> None:
    """Draw one dense blob into `volume` and append its Duke box (central slice) to `placed`."""
    slices, size, _ = volume.shape
    inner = np.argwhere(_erode(breast, max(4, size // 8)))
    for _ in range(50):  # rejection sampling: inside the breast, not on top of another mass
        row, column = inner[int(rng.integers(len(inner)))]
        radius = float(rng.uniform(0.045, 0.09) * difficulty.size * size)
        if all(np.hypot(column - m.centre[0], row - m.centre[1]) > 2.5 * radius for m in placed):
            break
    else:
        return  # no room left: the volume carries fewer masses than asked
    central = int(rng.integers(max(1, slices // 5), slices - max(1, slices // 5)))
    aspect = float(rng.uniform(0.75, 1.3))
    ry, rx = radius * aspect**0.5, radius / aspect**0.5
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    distance = np.sqrt(((xx - column) / rx) ** 2 + ((yy - row) / ry) ** 2)
    # A dense oval with a defined margin (0.3 radius wide), unlike the smooth glandular
    # blobs; spread over neighbouring slices with DBT's depth blur.
    profile = np.clip((1.15 - distance) / 0.3, 0, 1)
    spread = max(1.0, radius / 6.0)
    amplitude = 0.3 * difficulty.contrast_factor(knob)
    for index in range(slices):
        weight = np.exp(-((index - central) ** 2) / (2 * spread**2))
        volume[index] += amplitude * weight * profile * breast
    mass = Mass(
        slice=central,
        x=round(column - rx),
        y=round(row - ry),
        width=round(2 * rx),
        height=round(2 * ry),
    )
    placed.append(mass)


def _add_look_alike(
    volume: np.ndarray,
    knob: np.random.Generator,
    breast: np.ndarray,
    placed: list[Mass],
    difficulty: Difficulty,
) -> None:
    """One normal structure that looks like a lesion, into `volume` in place, away from the
    masses: a dense glandular blob (mass-sized, but with a soft margin and blurred over more
    slices) or a cluster of calcification-like dots (bright specks a pixel or two across)."""
    slices, size, _ = volume.shape
    inner = np.argwhere(_erode(breast, max(4, size // 8)))
    row, column = inner[int(knob.integers(len(inner)))]
    if any(
        np.hypot(column - m.centre[0], row - m.centre[1]) < max(m.width, m.height) for m in placed
    ):
        return  # it would overlap a mass: a look-alike never hides or enlarges a real one
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    central = int(knob.integers(0, slices))
    depth = np.arange(slices, dtype=np.float32)[:, None, None]
    if knob.random() < 0.6:
        radius = float(knob.uniform(0.04, 0.08) * difficulty.size * size)
        blob = np.exp(-((xx - column) ** 2 + (yy - row) ** 2) / (2 * (radius / 1.5) ** 2))
        weight = np.exp(-((depth - central) ** 2) / (2 * max(1.5, radius / 4.0) ** 2))
        volume += 0.3 * difficulty.contrast_factor(knob) * weight * blob * breast
        return
    for _ in range(int(knob.integers(3, 8))):
        dot_y, dot_x = row + knob.normal(0, 3), column + knob.normal(0, 3)
        dot = ((xx - dot_x) ** 2 + (yy - dot_y) ** 2) <= knob.uniform(0.5, 1.5) ** 2
        weight = np.exp(-((depth - central) ** 2) / 2.0)
        volume += 0.5 * difficulty.contrast_factor(knob) * weight * dot * breast


def _texture(rng: np.random.Generator, slices: int, size: int) -> np.ndarray:
    """Fibroglandular tissue: smooth 3D noise at two scales, varying across slices."""
    texture = np.zeros((slices, size, size), dtype=np.float32)
    for cells, depth_cells, weight in ((6, 3, 1.0), (16, 6, 0.5)):
        coarse = rng.normal(0, 1, (depth_cells + 1, cells + 2, cells + 2)).astype(np.float32)
        planes = np.stack([_upsample(plane, size) for plane in coarse])
        position = np.linspace(0, depth_cells, slices)
        low = np.floor(position).astype(int).clip(0, depth_cells - 1)
        fraction = (position - low)[:, None, None].astype(np.float32)
        texture += weight * ((1 - fraction) * planes[low] + fraction * planes[low + 1])
    return texture


def _upsample(plane: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(plane, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion by a (2*steps+1) diamond, with numpy shifts (no scipy here); outside the
    image counts as background, so nothing eroded touches the image edge."""
    eroded = mask.copy()
    eroded[:steps], eroded[-steps:], eroded[:, :steps], eroded[:, -steps:] = (
        False,
        False,
        False,
        False,
    )
    for _ in range(steps):
        shrunk = eroded.copy()
        shrunk[1:] &= eroded[:-1]
        shrunk[:-1] &= eroded[1:]
        shrunk[:, 1:] &= eroded[:, :-1]
        shrunk[:, :-1] &= eroded[:, 1:]
        eroded = shrunk
    return eroded


# --- DICOM ------------------------------------------------------------------------------------


def tomosynthesis_dataset(
    phantom: BreastPhantom,
    *,
    patient_id: str,
    patient_name: str = "Phantom^Breast",
    study_uid: str | None = None,
    seed: int = 0,
    study_seed: int | None = None,
) -> Dataset:
    """A Breast Tomosynthesis Image (enhanced multi-frame) holding the volume, with file meta.

    `study_seed` (default `seed`) makes the study-level attributes (Accession Number, Study
    Date and Time): volumes of one study pass the same one, or a study-level C-FIND, the
    worklist and the SR would each see a different accession and study time for one study."""
    uid = uid_factory(f"{patient_id}/{seed}/{phantom.view}")
    slices = phantom.volume.shape[0]
    ds = Dataset()
    ds.SOPClassUID = BreastTomosynthesisImageStorage
    ds.SOPInstanceUID = uid("instance")
    ds.StudyInstanceUID = study_uid or uid("study")
    ds.SeriesInstanceUID = uid(f"series/{ds.StudyInstanceUID}")
    ds.FrameOfReferenceUID = uid(f"frame-of-reference/{ds.StudyInstanceUID}")
    study_seed = seed if study_seed is None else study_seed
    started = PHANTOM_EPOCH + dt.timedelta(seconds=study_seed)
    now = PHANTOM_EPOCH + dt.timedelta(seconds=seed)  # this volume's acquisition
    ds.StudyDate, ds.StudyTime = started.strftime("%Y%m%d"), started.strftime("%H%M%S")
    ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = f"ACC{study_seed:08d}"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.Modality = "MG"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDescription = f"Tomosynthesis {phantom.view}"
    ds.PositionReferenceIndicator = ""
    _equipment(ds)
    _image(ds, phantom)
    ds.NumberOfFrames = slices
    ds.DimensionOrganizationSequence = [_dimension_organisation(uid("dimensions"))]
    ds.DimensionIndexSequence = [_dimension_index(uid("dimensions"))]
    ds.SharedFunctionalGroupsSequence = [_shared_groups(phantom)]
    ds.PerFrameFunctionalGroupsSequence = [
        _frame_groups(index, now.strftime("%Y%m%d%H%M%S")) for index in range(slices)
    ]
    ds.PixelData = phantom.volume.tobytes()

    return with_file_meta(ds)


def write_tomosynthesis(
    path: Path,
    *,
    seed: int,
    patient_id: str = "PHANTOM",
    study_uid: str | None = None,
    study_seed: int | None = None,
    view: str = "LCC",
    masses: int = 0,
    slices: int = 16,
    size: int = 128,
    difficulty: Difficulty = EASY,
) -> tuple[Dataset, BreastPhantom]:
    """Make one phantom volume and write it as a DICOM file; returns dataset and phantom.
    Volumes of one study share `study_uid` and `study_seed`."""
    phantom = make_breast_phantom(
        seed, slices=slices, size=size, view=view, masses=masses, difficulty=difficulty
    )
    ds = tomosynthesis_dataset(
        phantom, patient_id=patient_id, study_uid=study_uid, seed=seed, study_seed=study_seed
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds, phantom


def _equipment(ds: Dataset) -> None:
    ds.Manufacturer = "cadnode synthetic phantom"
    ds.ManufacturerModelName = "cadnode.infer.phantoms.breast"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "1"


def _image(ds: Dataset, phantom: BreastPhantom) -> None:
    """Image pixel, enhanced mammography image, X-ray 3D image and breast view attributes."""
    _, rows, columns = phantom.volume.shape
    ds.ImageType = IMAGE_TYPE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "TOMOSYNTHESIS"
    ds.PresentationLUTShape = "IDENTITY"
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.BodyPartExamined = "BREAST"
    ds.PartialView = "NO"
    ds.BreastImplantPresent = "NO"
    ds.ViewCodeSequence = [coded(*VIEW_CODES[phantom.view[1:]])]
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = []
    ds.AcquisitionContextSequence = []


def _shared_groups(phantom: BreastPhantom) -> Dataset:
    """What every frame shares: spacing, orientation, anatomy, rescale, and the VOI window."""
    group = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
    measures.SliceThickness = SLICE_SPACING_MM
    measures.SpacingBetweenSlices = SLICE_SPACING_MM
    group.PixelMeasuresSequence = [measures]
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    group.PlaneOrientationSequence = [orientation]
    anatomy = Dataset()
    anatomy.FrameLaterality = phantom.laterality
    anatomy.AnatomicRegionSequence = [coded("76752008", "SCT", "Breast")]
    group.FrameAnatomySequence = [anatomy]
    transformation = Dataset()
    transformation.RescaleIntercept = 0
    transformation.RescaleSlope = 1
    transformation.RescaleType = "US"
    group.PixelValueTransformationSequence = [transformation]
    window = Dataset()
    window.WindowCenter, window.WindowWidth = WINDOW
    window.VOILUTFunction = "LINEAR"
    group.FrameVOILUTSequence = [window]
    return group


def _frame_groups(index: int, acquired: str) -> Dataset:
    """Per frame: its place in the stack (dimension index) and in patient space."""
    group = Dataset()
    content = Dataset()
    content.DimensionIndexValues = [index + 1]
    content.FrameAcquisitionNumber = 1
    content.FrameReferenceDateTime = content.FrameAcquisitionDateTime = acquired
    content.FrameAcquisitionDuration = 100  # ms; a real sweep takes a few seconds
    group.FrameContentSequence = [content]
    frame_type = Dataset()
    frame_type.FrameType = IMAGE_TYPE
    frame_type.PixelPresentation = "MONOCHROME"
    frame_type.VolumetricProperties = "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "TOMOSYNTHESIS"
    group.XRay3DFrameTypeSequence = [frame_type]
    position = Dataset()
    position.ImagePositionPatient = [0.0, 0.0, float(index * SLICE_SPACING_MM)]
    group.PlanePositionSequence = [position]
    return group


def _dimension_organisation(uid: str) -> Dataset:
    item = Dataset()
    item.DimensionOrganizationUID = uid
    return item


def _dimension_index(uid: str) -> Dataset:
    """Frames are ordered by their position along the stack (Image Position (Patient))."""
    item = Dataset()
    item.DimensionOrganizationUID = uid
    item.DimensionIndexPointer = 0x00200032
    item.FunctionalGroupPointer = 0x00209113
    item.DimensionDescriptionLabel = "Slice position"
    return item


# --- planned sets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeCase:
    """One planned volume: 4 consecutive seeds make one study (LCC, RCC, LMLO, RMLO)."""

    seed: int
    first_seed: int  # of the whole set: studies are counted from it
    masses: int
    cancer: bool  # Duke's Class of its boxes: cancer, else benign

    @property
    def study_index(self) -> int:
        return (self.seed - self.first_seed) // len(VIEWS)

    @property
    def study_seed(self) -> int:
        """The seed of the study's first view: its study-level attributes come from it."""
        return self.first_seed + self.study_index * len(VIEWS)

    @property
    def patient_id(self) -> str:
        return f"DBT{self.study_seed:08d}"

    @property
    def view(self) -> str:
        return VIEWS[(self.seed - self.first_seed) % len(VIEWS)]

    @property
    def study_uid(self) -> str:
        return str(uid_factory(self.patient_id)("study"))


def plan_volumes(seeds: range, positive_fraction: float) -> list[VolumeCase]:
    """Which volumes carry masses (1 or 2, chosen reproducibly) and whether they are cancer."""
    rng = np.random.default_rng(seeds.start)
    count = len(seeds)
    positive = np.zeros(count, dtype=bool)
    positive[rng.permutation(count)[: round(count * positive_fraction)]] = True
    masses = np.where(positive, rng.integers(1, 3, count), 0)
    cancer = rng.random(count) < 0.5
    return [
        VolumeCase(seed, seeds.start, int(m), bool(c))
        for seed, m, c in zip(seeds, masses, cancer, strict=True)
    ]


def render_volume(
    case: VolumeCase, *, slices: int, size: int, difficulty: Difficulty = EASY
) -> tuple[Dataset, BreastPhantom]:
    """The DICOM dataset of a planned volume, built in memory exactly as written to disk."""
    phantom = make_breast_phantom(
        case.seed,
        slices=slices,
        size=size,
        view=case.view,
        masses=case.masses,
        difficulty=difficulty,
    )
    ds = tomosynthesis_dataset(
        phantom,
        patient_id=case.patient_id,
        study_uid=case.study_uid,
        seed=case.seed,
        study_seed=case.study_seed,
    )
    return ds, phantom
