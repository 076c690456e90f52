"""A result's thumbnail: its source image with the engine's masks and boxes drawn over."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread

from cadnode.encode.overlay import BoxSpec, render_overlay
from cadnode.infer.answers import (
    DetectAnswer,
    DetectFinding,
    SegmentAnswer,
    load_masks,
    parse_answer,
)

THUMBNAIL_SIZE = 384


def overlay_png(image: Path, stored: dict[str, Any], answers_dir: Path, *, limit: int) -> bytes:
    """PNG of `image` (a spooled instance) with the findings of the `stored` answer
    (cadnode.infer.answers): a segmentation's masks, a detector's boxes on the frame where the
    best one scores highest. Only that frame is decoded, within `limit` bytes
    (cadnode.dicom.pixels.ImageRefused past it)."""
    answer = parse_answer(stored)
    dataset = dcmread(image)
    frame, masks, boxes = 1, None, []
    if isinstance(answer, SegmentAnswer):
        masks = load_masks(answers_dir / answer.mask_file)[0]
    elif isinstance(answer, DetectAnswer) and answer.findings:
        frame = answer.best_frame()
        boxes = [_box(f) for f in answer.findings_on(frame)]
    rgb = render_overlay(
        dataset, frame=frame, masks=masks, boxes=boxes, max_size=THUMBNAIL_SIZE, limit=limit
    )
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _box(finding: DetectFinding) -> BoxSpec:
    box, text = finding.box, f"{finding.label.name} {finding.probability:.2f}"
    return (box.x, box.y, box.width, box.height, text)
