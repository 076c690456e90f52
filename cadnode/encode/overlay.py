"""Findings drawn over the image they were found on, as 8-bit RGB.

A neutral helper: the Secondary Capture encoder burns it into a derived image for PACS that
cannot show SEG or SR, and the dashboard shows it as a thumbnail. It draws, it does not
decide: masks, boxes and the caption come from the caller.

Pixels are shown as a radiologist reads them (`cadnode.infer.preprocess`: rescaled, windowed,
bright = dense), stretched to 0..255. Masks are blended semi-transparently, one colour per
label (in label order), with their outline drawn opaque so a small segment stays visible;
boxes are rectangle outlines with their text above.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset

from cadnode.dicom.pixels import decoded_pixels
from cadnode.infer.preprocess import display_pixels, frame_rescale, frame_window

# One colour per label, in label order (repeats after the last): distinguishable on grey.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 200, 255),  # cyan
    (80, 220, 80),  # green
    (255, 60, 60),  # red
    (255, 200, 0),  # amber
    (200, 90, 255),  # violet
    (255, 130, 200),  # pink
)
BOX_COLOUR = (255, 220, 0)
MASK_OPACITY = 0.35

# A box: x (column) and y (row) of its top-left corner, width and height in source pixels,
# and the text shown with it (e.g. "mass 0.87").
BoxSpec = tuple[float, float, float, float, str]


def render_overlay(
    ds: Dataset,
    *,
    frame: int = 1,
    masks: np.ndarray | None = None,
    boxes: Sequence[BoxSpec] = (),
    colours: Sequence[tuple[int, int, int]] = PALETTE,
    caption: str | None = None,
    max_size: int | None = None,
    limit: int,
) -> np.ndarray:
    """The 1-based `frame` of `ds` as (rows, columns, 3) uint8 RGB with findings drawn.

    `masks` is bool (labels, rows, columns) at the source size; label i takes colours[i].
    `boxes` are in source pixels. With `max_size`, the picture is shrunk (keeping aspect) so
    its longer side is at most that; lines and text are drawn after shrinking so they stay
    legible. `caption` is written on a dark band across the top (burned-in annotation).
    The image is decoded within `limit` bytes (cadnode.dicom.pixels.ImageRefused past it).
    """
    grey = _to_bytes(frame_pixels(ds, frame, limit))
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    if masks is not None:
        rgb = _blend(rgb, _checked_masks(masks, grey.shape), colours)
    picture = Image.fromarray(rgb, mode="RGB")
    scale = 1.0
    if max_size is not None and max(picture.size) > max_size:
        scale = max_size / max(picture.size)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(picture)
    font = _font(picture)
    for x, y, width, height, text in boxes:
        _draw_box(draw, font, (x * scale, y * scale, width * scale, height * scale), text)
    if caption:
        _draw_caption(draw, font, picture.width, caption)
    return np.asarray(picture, dtype=np.uint8)


def frame_pixels(ds: Dataset, frame: int, limit: int) -> np.ndarray:
    """The 1-based `frame` as float display values (per-frame rescale and window applied);
    only that frame is decoded."""
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if not 1 <= frame <= frames:
        raise ValueError(f"frame {frame} is outside 1..{frames}")
    if frames == 1:
        return display_pixels(ds, limit)
    index = frame - 1
    slope, intercept = frame_rescale(ds, index)
    pixels = decoded_pixels(ds, limit, frame=index)
    values: np.ndarray = pixels.astype(np.float32) * slope + intercept
    window = frame_window(ds, index)
    if window is not None:
        centre, width = window
        values = np.clip(values, centre - width / 2, centre + width / 2)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        values = values.max() - values
    return values


def _to_bytes(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _checked_masks(masks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if masks.ndim != 3 or masks.shape[1:] != shape:
        raise ValueError(f"masks must be (labels, {shape[0]}, {shape[1]}), got {masks.shape}")
    return masks.astype(bool, copy=False)


def _blend(
    rgb: np.ndarray, masks: np.ndarray, colours: Sequence[tuple[int, int, int]]
) -> np.ndarray:
    out = rgb.astype(np.float32)
    for index, mask in enumerate(masks):
        if not mask.any():
            continue
        colour = np.asarray(colours[index % len(colours)], dtype=np.float32)
        out[mask] = (1 - MASK_OPACITY) * out[mask] + MASK_OPACITY * colour
        out[_outline(mask)] = colour
    return np.round(out).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (or on the image border)."""
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = (
        mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    )
    edge: np.ndarray = mask & ~inner
    return edge


def _font(picture: Image.Image) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(9, min(picture.size) // 32))


def _draw_box(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    box: tuple[float, float, float, float],
    text: str,
) -> None:
    x, y, width, height = box
    line = max(1, round(min(draw.im.size) / 256))
    draw.rectangle((x, y, x + width - 1, y + height - 1), outline=BOX_COLOUR, width=line)
    if text:
        _, top, _, bottom = draw.textbbox((0, 0), text, font=font)
        above = y - (bottom - top) - 2
        draw.text((x, above if above >= 0 else y + height + 1), text, fill=BOX_COLOUR, font=font)


def _draw_caption(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    width: int,
    caption: str,
) -> None:
    """White text on a black band across the top, wrapped at word boundaries to fit."""
    lines: list[str] = []
    for word in caption.split():
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(joined, font=font) <= width - 4:
            lines[-1] = joined
        else:
            lines.append(word)
    text = "\n".join(lines)
    _, top, _, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    draw.rectangle((0, 0, width - 1, bottom - top + 4), fill=(0, 0, 0))
    draw.multiline_text((2, 2 - top), text, fill=(255, 255, 255), font=font)
