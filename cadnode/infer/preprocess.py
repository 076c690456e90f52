"""DICOM image to model tensor: the one path shared by training and inference.

Training (`training/`) and the daemon (`cadnode.infer`) both call `image_to_tensor`, so an
engine sees at inference exactly the pixels it was trained on. Pixels are decoded through
`cadnode.dicom.pixels`, within `limit` bytes (ImageRefused past it, or when a codestream's header
disagrees with its dataset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from cadnode.dicom.pixels import decoded_pixels


@dataclass(frozen=True)
class Geometry:
    """How model-space pixels map back to the source image (for masks and boxes)."""

    source_rows: int
    source_columns: int
    scale: float  # model pixels per source pixel
    pad_top: int
    pad_left: int
    pixel_spacing_mm: tuple[float, float] | None


def display_pixels(ds: Dataset, limit: int) -> np.ndarray:
    """The first frame as a radiologist would see it: rescaled, windowed, bright = dense."""
    pixels = decoded_pixels(ds, limit, frame=0)  # of a volume, only the frame shown
    values = apply_modality_lut(pixels, ds)
    values = apply_voi_lut(values, ds) if _has_voi(ds) else values
    values = values.astype(np.float32)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        values = values.max() - values
    return values


def image_to_tensor(ds: Dataset, size: int, *, limit: int) -> tuple[np.ndarray, Geometry]:
    """Normalise to [0, 1], fit into `size` x `size` keeping aspect, pad with zeros.

    Returns a float32 array shaped (1, size, size) and the geometry to map results back.
    """
    values = display_pixels(ds, limit)
    low, high = float(values.min()), float(values.max())
    values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    square, (scale, pad_top, pad_left) = fit_square(values, size)
    rows, columns = values.shape
    geometry = Geometry(rows, columns, scale, pad_top, pad_left, pixel_spacing_mm(ds))
    return square[None], geometry


def fit_square(values: np.ndarray, size: int) -> tuple[np.ndarray, tuple[float, int, int]]:
    """Resize (bilinear) to fit `size` x `size` keeping aspect, centred on zeros.

    Returns the (size, size) float32 image and (scale, pad_top, pad_left).
    """
    rows, columns = values.shape
    scale = size / max(rows, columns)
    new_rows, new_columns = max(1, round(rows * scale)), max(1, round(columns * scale))
    resized = Image.fromarray(values.astype(np.float32, copy=False), mode="F").resize(
        (new_columns, new_rows), Image.Resampling.BILINEAR
    )
    square = np.zeros((size, size), dtype=np.float32)
    pad_top, pad_left = (size - new_rows) // 2, (size - new_columns) // 2
    square[pad_top : pad_top + new_rows, pad_left : pad_left + new_columns] = np.asarray(
        resized, dtype=np.float32
    )
    return square, (scale, pad_top, pad_left)


def frames_to_tensor(ds: Dataset, size: int, *, limit: int) -> tuple[np.ndarray, Geometry]:
    """Every frame of a multi-frame image (e.g. a DBT volume) as model input (F, 1, S, S).

    Each frame is rescaled and windowed with its own functional groups (per-frame first,
    then shared; Duke BCS-DBT reads the window there, seed 003 A.8), mapped to [0, 1]
    (window low -> 0, high -> 1, clipped), and fitted like `image_to_tensor`. A frame
    without any window is min-max normalised. Pixels keep their orientation: boxes found in
    model space map back through the returned geometry.
    """
    pixels = decoded_pixels(ds, limit)
    volume = pixels[None] if pixels.ndim == 2 else pixels
    tensors = np.empty((len(volume), 1, size, size), dtype=np.float32)
    scale, pad_top, pad_left = 1.0, 0, 0
    for index, frame in enumerate(volume):
        slope, intercept = frame_rescale(ds, index)
        values = frame.astype(np.float32) * slope + intercept
        window = frame_window(ds, index)
        if window is None:
            low, high = float(values.min()), float(values.max())
        else:
            centre, width = window
            low, high = centre - width / 2, centre + width / 2
        values = np.clip((values - low) / (high - low), 0, 1) if high > low else values * 0
        tensors[index, 0], (scale, pad_top, pad_left) = fit_square(values, size)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        tensors = 1.0 - tensors
    rows, columns = volume.shape[1:]
    geometry = Geometry(rows, columns, scale, pad_top, pad_left, frame_pixel_spacing_mm(ds))
    return tensors, geometry


def _frame_item(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The first item of a functional-group `sequence` for frame `index`: per-frame, else
    shared, else None."""
    for groups, position in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items is not None and len(items) > position:
            inner = items[position].get(sequence)
            if inner is not None and len(inner) > 0:
                item: Dataset = inner[0]
                return item
    return None


def frame_window(ds: Dataset, index: int = 0) -> tuple[float, float] | None:
    """(centre, width) of frame `index`: Frame VOI LUT group, else the top-level window."""
    item = _frame_item(ds, index, "FrameVOILUTSequence") or ds
    centre, width = item.get("WindowCenter"), item.get("WindowWidth")
    if centre is None or width is None:
        return None
    return _first(centre), _first(width)


def _first(value: object) -> float:
    """A window value may be multi-valued (several windows offered): the first is the default."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def frame_rescale(ds: Dataset, index: int = 0) -> tuple[float, float]:
    """(slope, intercept): Pixel Value Transformation group, else top level, else identity."""
    item = _frame_item(ds, index, "PixelValueTransformationSequence") or ds
    return float(item.get("RescaleSlope", 1) or 1), float(item.get("RescaleIntercept", 0) or 0)


def frame_pixel_spacing_mm(ds: Dataset) -> tuple[float, float] | None:
    """Pixel Measures group spacing, else the single-frame attributes."""
    item = _frame_item(ds, 0, "PixelMeasuresSequence")
    spacing = item.get("PixelSpacing") if item is not None else None
    if spacing is not None and len(spacing) == 2:
        return float(spacing[0]), float(spacing[1])
    return pixel_spacing_mm(ds)


def pixel_spacing_mm(ds: Dataset) -> tuple[float, float] | None:
    """Row and column spacing; projection radiographs carry Imager Pixel Spacing."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = ds.get(keyword)
        if spacing is not None and len(spacing) == 2:
            return float(spacing[0]), float(spacing[1])
    return None


def _has_voi(ds: Dataset) -> bool:
    return "WindowCenter" in ds or "VOILUTSequence" in ds
