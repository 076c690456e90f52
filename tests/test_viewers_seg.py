"""cadnode's SEGs load in the viewers: cornerstone3D's SEG adapter as OHIF calls it, and dcmjs.

Each SEG is built by `cadnode.encode.seg.segmentation` from phantom masks (a chest film with
three labels, one of them empty or overlapping another; a tomosynthesis volume), binary and
LABELMAP, and loaded by tests/viewers/seg_load.mjs. Every segment's labelled pixels, in all
and per source frame, must equal the masks' (for a labelmap: the masks painted in segment
order, the higher number over the lower) and highdicom's read-back of the same file.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from cadnode.encode.seg import segmentation
from cadnode.infer.answers import PointReached, SegmentFinding
from tests.dicom_validation import saved
from tests.encode_cases import MASS, SEGMENTER, film_with_masks, segment_findings, volume
from tests.viewers.node import run_script

WHEN = dt.datetime(2026, 1, 2, 9, 30, 0)
READERS = ("cornerstone3D", "dcmjs")

Counts = dict[int, dict[str, int]]  # segment number -> "SOP UID/frame" -> labelled pixels


def build(
    tmp_path: Path,
    source: pydicom.Dataset,
    masks: np.ndarray,
    findings: list[SegmentFinding],
    labelmap: bool,
) -> Path:
    kind = "labelmap" if labelmap else "binary"
    seg = segmentation(
        source,
        masks,
        findings,
        SEGMENTER,
        series_instance_uid=generate_uid(entropy_srcs=["test-viewers-seg", kind, "series"]),
        sop_instance_uid=generate_uid(entropy_srcs=["test-viewers-seg", kind]),
        content_datetime=WHEN,
        labelmap=labelmap,
    )
    return saved(seg, tmp_path / f"seg-{kind}.dcm")


def expected(source: pydicom.Dataset, masks: np.ndarray, labelmap: bool) -> Counts:
    """Per segment and source frame, the pixels a reader must find labelled."""
    if labelmap:  # what a label image keeps: the highest segment number wins a pixel
        painted = np.zeros(masks[:, 0].shape, dtype=np.uint16)
        for index in range(masks.shape[1]):
            painted[masks[:, index]] = index + 1
        planes = [painted == number for number in range(1, masks.shape[1] + 1)]
    else:
        planes = [masks[:, index] for index in range(masks.shape[1])]
    return {number: per_frame(source, plane) for number, plane in enumerate(planes, start=1)}


def per_frame(source: pydicom.Dataset, plane: np.ndarray) -> dict[str, int]:
    counts = plane.reshape(plane.shape[0], -1).sum(axis=1)
    return {
        f"{source.SOPInstanceUID}/{frame}": int(count)
        for frame, count in enumerate(counts, start=1)
        if count
    }


def read_back(seg_path: Path, source: pydicom.Dataset, segments: int) -> Counts:
    """highdicom's pixels of each segment, per source frame."""
    seg = hd.seg.segread(seg_path)
    numbers = list(range(1, segments + 1))
    frames = int(getattr(source, "NumberOfFrames", 1) or 1)
    if frames == 1:  # a film's SEG references the film, not a frame of it
        pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=numbers)
    else:
        pixels = seg.get_pixels_by_source_frame(
            source.SOPInstanceUID,
            source_frame_numbers=list(range(1, frames + 1)),
            segment_numbers=numbers,
            assert_missing_frames_are_empty=True,
        )
    return {number: per_frame(source, pixels[..., number - 1].astype(bool)) for number in numbers}


def loaded(seg_path: Path, source_path: Path, reader: str) -> tuple[Counts, Any]:
    ran = run_script("seg_load.mjs", "--reader", reader, seg_path, source_path)
    assert ran.status == 0, f"{reader} did not load {seg_path.name}: {ran.stderr}"
    segments = ran.printed["segments"]
    background = segments.pop("0", None)  # a labelmap describes its background as segment 0
    assert background is None or background["pixels"] == 0, background
    counts = {int(number): segment["frames"] for number, segment in segments.items()}
    return counts, ran.printed


def assert_loaded_as_built(
    seg_path: Path, source: pydicom.Dataset, source_path: Path, masks: np.ndarray, labelmap: bool
) -> dict[str, Any]:
    want = expected(source, masks, labelmap)
    assert read_back(seg_path, source, masks.shape[1]) == want
    printed = {}
    for reader in READERS:
        counts, printed[reader] = loaded(seg_path, source_path, reader)
        assert counts == want, reader
    return printed


@pytest.mark.parametrize("labelmap", [False, True], ids=["binary", "labelmap"])
def test_film_seg_with_an_empty_label_loads(tmp_path: Path, labelmap: bool) -> None:
    film, masks = film_with_masks(tmp_path, pneumothorax=False)
    assert not masks[:, 2].any()  # pneumothorax found nowhere
    path = build(tmp_path, film, masks, segment_findings(film, masks), labelmap)
    printed = assert_loaded_as_built(path, film, film_path(tmp_path, False), masks, labelmap)
    # The empty label is still a described segment, with no pixel.
    segment = printed["cornerstone3D"]["segments"]["3"]
    assert (segment["label"], segment["pixels"]) == ("pneumothorax", 0)


@pytest.mark.parametrize("labelmap", [False, True], ids=["binary", "labelmap"])
def test_film_seg_with_overlapping_labels_loads(tmp_path: Path, labelmap: bool) -> None:
    film, masks = film_with_masks(tmp_path, pneumothorax=True)
    masks[0, 0] |= masks[0, 2]  # the right lung's mask also covers the pneumothorax
    overlap = int((masks[0, 0] & masks[0, 2]).sum())
    assert overlap > 0
    path = build(tmp_path, film, masks, segment_findings(film, masks), labelmap)
    printed = assert_loaded_as_built(path, film, film_path(tmp_path, True), masks, labelmap)
    cornerstone = printed["cornerstone3D"]
    if labelmap:  # one label image; the pneumothorax (3) kept the overlap, the lung lost it
        assert cornerstone["groups"] == 1
        assert cornerstone["segments"]["1"]["pixels"] == int(masks[0, 0].sum()) - overlap
    else:  # cornerstone keeps overlapping segments in separate label images
        assert (cornerstone["overlapping"], cornerstone["groups"]) == (True, 2)


@pytest.mark.parametrize("labelmap", [False, True], ids=["binary", "labelmap"])
def test_volume_seg_loads_on_its_frames(tmp_path: Path, labelmap: bool) -> None:
    source, boxes = volume(tmp_path, masses=2, seed=6)
    masks = np.zeros((int(source.NumberOfFrames), 1, source.Rows, source.Columns), dtype=bool)
    for box in boxes:
        first = box.first_frame - 1
        rows = slice(int(box.y), int(box.y + box.height))
        columns = slice(int(box.x), int(box.x + box.width))
        masks[first : first + box.depth, 0, rows, columns] = True
    finding = SegmentFinding(
        label=MASS,
        segment_number=1,
        probability=0.9,
        operating_points={"present": PointReached(threshold=0.5, reached=True)},
    )
    path = build(tmp_path, source, masks, [finding], labelmap)
    printed = assert_loaded_as_built(path, source, tmp_path / "volume-6-2.dcm", masks, labelmap)
    frames = printed["cornerstone3D"]["segments"]["1"]["frames"]
    assert sorted(int(key.split("/")[1]) for key in frames) == [11, 12, 13]


def film_path(folder: Path, pneumothorax: bool) -> Path:
    """Where `film_with_masks` wrote the film (seed 3)."""
    return folder / f"film-3-{pneumothorax}.dcm"
