"""DICOM image to model tensor: the one path shared by training and inference.

Training (`training/`) and the daemon (`cadnode.infer`) both call `image_to_tensor`, so an
engine sees at inference exactly the pixels it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut


@dataclass(frozen=True)
class Geometry:
    """How model-space pixels map back to the source image (for masks and boxes)."""

    source_rows: int
    source_columns: int
    scale: float  # model pixels per source pixel
    pad_top: int
    pad_left: int
    pixel_spacing_mm: tuple[float, float] | None


def display_pixels(ds: Dataset) -> np.ndarray:
    """The first frame as a radiologist would see it: rescaled, windowed, bright = dense."""
    pixels = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    values = apply_modality_lut(pixels, ds)
    values = apply_voi_lut(values, ds) if _has_voi(ds) else values
    values = values.astype(np.float32)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        values = values.max() - values
    return values


def image_to_tensor(ds: Dataset, size: int) -> tuple[np.ndarray, Geometry]:
    """Normalise to [0, 1], fit into `size` x `size` keeping aspect, pad with zeros.

    Returns a float32 array shaped (1, size, size) and the geometry to map results back.
    """
    values = display_pixels(ds)
    low, high = float(values.min()), float(values.max())
    values = (values - low) / (high - low) if high > low else np.zeros_like(values)

    rows, columns = values.shape
    scale = size / max(rows, columns)
    new_rows, new_columns = max(1, round(rows * scale)), max(1, round(columns * scale))
    resized = Image.fromarray(values, mode="F").resize(
        (new_columns, new_rows), Image.Resampling.BILINEAR
    )
    tensor = np.zeros((1, size, size), dtype=np.float32)
    pad_top, pad_left = (size - new_rows) // 2, (size - new_columns) // 2
    tensor[0, pad_top : pad_top + new_rows, pad_left : pad_left + new_columns] = np.asarray(
        resized, dtype=np.float32
    )
    geometry = Geometry(rows, columns, scale, pad_top, pad_left, pixel_spacing_mm(ds))
    return tensor, geometry


def pixel_spacing_mm(ds: Dataset) -> tuple[float, float] | None:
    """Row and column spacing; projection radiographs carry Imager Pixel Spacing."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = ds.get(keyword)
        if spacing is not None and len(spacing) == 2:
            return float(spacing[0]), float(spacing[1])
    return None


def _has_voi(ds: Dataset) -> bool:
    return "WindowCenter" in ds or "VOILUTSequence" in ds
