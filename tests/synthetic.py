"""Synthetic studies for the ingest tests and benchmark: CT series and DX films, fast to write.

The pixels are noise (only their size matters here); every instance is a valid DICOM file
with its own UIDs, so nothing is deduplicated by accident.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)


def write_ct_series(
    folder: Path, count: int, *, size: int = 512, seed: int = 0, study_uid: str | None = None
) -> list[Path]:
    """`count` axial CT slices of `size` x `size` in one series of one study."""
    rng = np.random.default_rng(seed)
    base = _image(CTImageStorage, "CT", size, study_uid or generate_uid())
    base.update(_ct_attributes())
    paths = []
    for number in range(1, count + 1):
        base.InstanceNumber = number
        base.ImagePositionPatient = [0, 0, float(number)]
        pixels = rng.integers(0, 2000, (size, size), dtype=np.uint16)
        paths.append(_write(base, pixels, folder / f"ct-{seed}-{number:04d}.dcm"))
    return paths


def write_dx_images(folder: Path, count: int, *, size: int = 3000, seed: int = 0) -> list[Path]:
    """`count` digital radiographs of `size` x `size`, one study."""
    rng = np.random.default_rng(seed)
    base = _image(DigitalXRayImageStorageForPresentation, "DX", size, generate_uid())
    base.update(_dx_attributes())
    paths = []
    for number in range(1, count + 1):
        base.InstanceNumber = number
        # One random row repeated: noise-like bytes without minutes of random generation.
        row = rng.integers(0, 4000, size, dtype=np.uint16)
        pixels = np.broadcast_to(np.roll(row, number), (size, size))
        paths.append(_write(base, pixels, folder / f"dx-{seed}-{number:04d}.dcm"))
    return paths


def write_image(
    path: Path, sop_class: str, modality: str, *, frames: int = 1, size: int = 64
) -> Dataset:
    """A small image of any SOP class (multi-frame when `frames` > 1), noise for pixels."""
    ds = _image(sop_class, modality, size, generate_uid())
    if frames > 1:
        ds.NumberOfFrames = frames
    pixels = np.random.default_rng(frames).integers(0, 4000, (frames, size, size), np.uint16)
    _write(ds, pixels, path)
    return ds


def _image(sop_class: str, modality: str, size: int, study_uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.PatientName = "Synthetic^Ingest"
    ds.PatientID = "SYNTH-INGEST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = "20250101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.Manufacturer = "cadnode tests"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def _ct_attributes() -> Dataset:
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    return ds


def _dx_attributes() -> Dataset:
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = "PELVIS"
    ds.ViewPosition = "AP"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImagerPixelSpacing = [0.14, 0.14]
    return ds


def _write(base: Dataset, pixels: np.ndarray, path: Path) -> Path:
    ds = base.copy()
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
