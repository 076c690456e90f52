"""A result's thumbnail: its source image with the engine's masks and boxes drawn over."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread

from cadnode.encode.overlay import BoxSpec, render_overlay
from cadnode.infer.answers import load_masks

THUMBNAIL_SIZE = 384


def overlay_png(image: Path, answer: dict[str, Any], answers_dir: Path, *, limit: int) -> bytes:
    """PNG of `image` (a spooled instance) with `answer`'s findings (cadnode.infer.answers):
    a segmentation's masks, a detector's boxes on the frame where the best one scores highest.
    Only that frame is decoded, within `limit` bytes (cadnode.dicom.pixels.ImageRefused past it)."""
    dataset = dcmread(image)
    frame, masks, boxes = 1, None, []
    if answer.get("task") == "segment":
        frame_masks = load_masks(answers_dir / str(answer["mask_file"]))
        masks = frame_masks[0]
    elif answer.get("task") == "detect" and answer.get("findings"):
        findings = answer["findings"]
        best = max(findings, key=lambda f: float(f["probability"]))
        frame = int(best["box"]["frame"])
        boxes = [_box(f) for f in findings if _shows_on(f["box"], frame)]
    rgb = render_overlay(
        dataset, frame=frame, masks=masks, boxes=boxes, max_size=THUMBNAIL_SIZE, limit=limit
    )
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _box(finding: dict[str, Any]) -> BoxSpec:
    box = finding["box"]
    text = f"{finding['label']['name']} {float(finding['probability']):.2f}"
    return (float(box["x"]), float(box["y"]), float(box["width"]), float(box["height"]), text)


def _shows_on(box: dict[str, Any], frame: int) -> bool:
    return int(box["first_frame"]) <= frame < int(box["first_frame"]) + int(box["depth"])
