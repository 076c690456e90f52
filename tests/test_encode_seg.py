"""The segmenter's SEG: valid DICOM, and it holds exactly the masks and codes of the answer;
binary, and LABELMAP on request; with the spatial attributes a viewer needs (a film's, a
volume's). tests/test_viewers_seg.py loads the same SEGs in the viewers."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from cadnode.encode.seg import segment_frames, segmentation
from cadnode.infer.answers import PointReached, SegmentFinding
from tests.dicom_validation import assert_valid, assert_valid_labelmap, saved
from tests.encode_cases import MASS, SEGMENTER, film_with_masks, segment_findings, volume

WHEN = dt.datetime(2026, 1, 2, 9, 30, 0)
SERIES_UID = generate_uid(entropy_srcs=["test-encode-seg", "series"])
SOP_UID = generate_uid(entropy_srcs=["test-encode-seg", "instance"])


def build(
    source: pydicom.Dataset,
    masks: np.ndarray,
    findings: list[SegmentFinding],
    *,
    labelmap: bool = False,
) -> hd.seg.Segmentation:
    return segmentation(
        source,
        masks,
        findings,
        SEGMENTER,
        series_instance_uid=SERIES_UID,
        sop_instance_uid=SOP_UID,
        content_datetime=WHEN,
        labelmap=labelmap,
    )


def mass_finding() -> SegmentFinding:
    return SegmentFinding(
        label=MASS,
        segment_number=1,
        probability=0.9,
        operating_points={"present": PointReached(threshold=0.5, reached=True)},
    )


@pytest.mark.parametrize("pneumothorax", [True, False], ids=["pneumothorax", "none"])
def test_film_seg_is_valid_and_reads_back(tmp_path: Path, pneumothorax: bool) -> None:
    film, masks = film_with_masks(tmp_path, pneumothorax=pneumothorax)
    path = saved(build(film, masks, segment_findings(film, masks)), tmp_path / "seg.dcm")
    assert_valid(path)

    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    assert seg.get_segment_numbers() == [1, 2, 3]
    for number, (name, code, category) in enumerate(
        [
            ("right lung", "3341006", "91723000"),
            ("left lung", "44029006", "91723000"),
            ("pneumothorax", "36118008", "49755003"),
        ],
        start=1,
    ):
        segment = seg.get_segment_description(number)
        assert segment.segment_label == name
        assert segment.segmented_property_type.value == code
        assert segment.segmented_property_category.value == category
        assert segment.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = segment.algorithm_identification
        assert algorithm is not None
        assert algorithm.name == SEGMENTER.name
        assert algorithm.version == SEGMENTER.version
        assert algorithm.family == codes.DCM.ArtificialIntelligence
        assert algorithm.parameters == {"sha256": SEGMENTER.sha256, "threshold": "0.5"}
    # Every segment keeps its frame; an absent pneumothorax is an explicit empty mask.
    assert int(seg.NumberOfFrames) == 3
    assert [segment_frames(seg, n) for n in (1, 2, 3)] == [[1], [2], [3]]
    pixels = seg.get_pixels_by_source_instance([film.SOPInstanceUID], segment_numbers=[1, 2, 3])
    assert np.array_equal(pixels[0].transpose(2, 0, 1).astype(bool), masks[0])
    assert bool(pixels[..., 2].any()) is pneumothorax

    assert seg.StudyInstanceUID == film.StudyInstanceUID
    assert seg.PatientID == film.PatientID
    [series] = seg.ReferencedSeriesSequence
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == film.SOPInstanceUID
    assert "not for primary diagnosis" in seg.SeriesDescription
    assert seg.ManufacturerModelName == "cadnode cxr-segmenter"
    assert (seg.ContentDate, seg.ContentTime) == ("20260102", "093000")


def test_volume_seg_keeps_only_frames_with_the_mask(tmp_path: Path) -> None:
    source, _ = volume(tmp_path, masses=1)
    masks = np.zeros((16, 1, 128, 128), dtype=bool)
    masks[6:10, 0, 40:60, 70:90] = True
    finding = SegmentFinding(
        label=MASS,
        segment_number=1,
        probability=0.9,
        operating_points={"present": PointReached(threshold=0.5, reached=True)},
    )
    path = saved(build(source, masks, [finding]), tmp_path / "seg.dcm")
    assert_valid(path)

    seg = hd.seg.segread(path)
    assert int(seg.NumberOfFrames) == 4  # frames 7..10 of the source; the empty ones omitted
    referenced = [
        int(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for frame in seg.PerFrameFunctionalGroupsSequence
    ]
    assert sorted(referenced) == [7, 8, 9, 10]  # highdicom orders them along the stack
    assert segment_frames(seg, 1) == [1, 2, 3, 4]
    pixels = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID,
        source_frame_numbers=list(range(1, 17)),
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )
    assert np.array_equal(pixels[..., 0].astype(bool), masks[:, 0])
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID


@pytest.mark.parametrize("labelmap", [False, True], ids=["binary", "labelmap"])
def test_same_inputs_same_bytes(tmp_path: Path, labelmap: bool) -> None:
    film, masks = film_with_masks(tmp_path, pneumothorax=True)
    findings = segment_findings(film, masks)
    first = saved(build(film, masks, findings, labelmap=labelmap), tmp_path / "1.dcm")
    again = saved(build(film, masks, findings, labelmap=labelmap), tmp_path / "2.dcm")
    assert first.read_bytes() == again.read_bytes()


def test_film_seg_is_on_the_films_grid(tmp_path: Path) -> None:
    """No Frame of Reference (the film has none), the film's Patient Orientation, each frame
    derived from the film pixel for pixel, and the shared Plane Orientation viewers assume
    for a film (cornerstone3D refuses a SEG without one: cadnode.encode.seg.sop) with the
    film's own spacing (OHIF's SEG viewport shows an error without it)."""
    film, masks = film_with_masks(tmp_path, pneumothorax=True)
    seg = pydicom.dcmread(saved(build(film, masks, segment_findings(film, masks)), tmp_path / "s"))
    assert "FrameOfReferenceUID" not in seg
    assert seg.PatientOrientation == film.PatientOrientation
    shared = seg.SharedFunctionalGroupsSequence[0]
    [orientation] = shared.PlaneOrientationSequence
    assert [float(v) for v in orientation.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    [measures] = shared.PixelMeasuresSequence
    film_spacing = film.get("PixelSpacing") or film.ImagerPixelSpacing
    assert [float(v) for v in measures.PixelSpacing] == [float(v) for v in film_spacing]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        assert "PlanePositionSequence" not in frame
        [source] = frame.DerivationImageSequence[0].SourceImageSequence
        assert source.ReferencedSOPInstanceUID == film.SOPInstanceUID


@pytest.mark.parametrize("labelmap", [False, True], ids=["binary", "labelmap"])
def test_volume_seg_is_in_the_volumes_frame_of_reference(tmp_path: Path, labelmap: bool) -> None:
    """The volume's Frame of Reference, its pixel measures and orientation shared, and each
    frame at the position of the source frame it is derived from."""
    source, _ = volume(tmp_path, masses=1)
    masks = np.zeros((16, 1, 128, 128), dtype=bool)
    masks[6:10, 0, 40:60, 70:90] = True
    path = saved(build(source, masks, [mass_finding()], labelmap=labelmap), tmp_path / "s.dcm")
    seg = pydicom.dcmread(path)
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    source_shared = source.SharedFunctionalGroupsSequence[0]
    assert (
        shared.PlaneOrientationSequence[0].ImageOrientationPatient
        == source_shared.PlaneOrientationSequence[0].ImageOrientationPatient
    )
    assert (
        shared.PixelMeasuresSequence[0].PixelSpacing
        == source_shared.PixelMeasuresSequence[0].PixelSpacing
    )
    for frame in seg.PerFrameFunctionalGroupsSequence:
        [reference] = frame.DerivationImageSequence[0].SourceImageSequence
        number = int(reference.ReferencedFrameNumber)
        source_frame = source.PerFrameFunctionalGroupsSequence[number - 1]
        assert (
            frame.PlanePositionSequence[0].ImagePositionPatient
            == source_frame.PlanePositionSequence[0].ImagePositionPatient
        )


@pytest.mark.parametrize("pneumothorax", [True, False], ids=["pneumothorax", "none"])
def test_film_labelmap_paints_the_higher_segment_over_the_lower(
    tmp_path: Path, pneumothorax: bool
) -> None:
    film, masks = film_with_masks(tmp_path, pneumothorax=pneumothorax)
    masks[0, 0] |= masks[0, 2]  # the right lung's mask also covers the pneumothorax
    path = saved(build(film, masks, segment_findings(film, masks), labelmap=True), tmp_path / "l")
    assert_valid_labelmap(path)

    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
    assert seg.SegmentationType == "LABELMAP"
    assert seg.get_segment_numbers() == [1, 2, 3]
    assert [s.segment_label for s in map(seg.get_segment_description, (1, 2, 3))] == [
        "right lung",
        "left lung",
        "pneumothorax",
    ]
    assert int(seg.NumberOfFrames) == 1  # one label image for the film
    pixels = seg.get_pixels_by_source_instance([film.SOPInstanceUID], segment_numbers=[1, 2, 3])
    labelled = pixels[0].transpose(2, 0, 1).astype(bool)
    assert np.array_equal(labelled[0], masks[0, 0] & ~masks[0, 2])  # the lung lost the overlap
    assert np.array_equal(labelled[1], masks[0, 1])
    assert np.array_equal(labelled[2], masks[0, 2])


def test_volume_labelmap_keeps_the_frames_with_a_label(tmp_path: Path) -> None:
    source, _ = volume(tmp_path, masses=1)
    masks = np.zeros((16, 1, 128, 128), dtype=bool)
    masks[6:10, 0, 40:60, 70:90] = True
    path = saved(build(source, masks, [mass_finding()], labelmap=True), tmp_path / "l.dcm")
    assert_valid_labelmap(path)
    seg = hd.seg.segread(path)
    assert int(seg.NumberOfFrames) == 4  # background-only frames are left out
    pixels = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID,
        source_frame_numbers=list(range(1, 17)),
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )
    assert np.array_equal(pixels[..., 0].astype(bool), masks[:, 0])
    with pytest.raises(ValueError, match="binary SEG"):
        segment_frames(seg, 1)


def test_a_labelmap_of_nothing_keeps_its_frames(tmp_path: Path) -> None:
    film, masks = film_with_masks(tmp_path, pneumothorax=False)
    masks[:] = False
    path = saved(build(film, masks, segment_findings(film, masks), labelmap=True), tmp_path / "l")
    seg = hd.seg.segread(path)
    assert int(seg.NumberOfFrames) == 1
    assert not seg.get_pixels_by_source_instance([film.SOPInstanceUID], segment_numbers=[1]).any()


def test_refuses_masks_that_do_not_fit(tmp_path: Path) -> None:
    film, masks = film_with_masks(tmp_path, pneumothorax=False)
    findings = segment_findings(film, masks)
    with pytest.raises(ValueError, match="do not fit"):
        build(film, masks[:, :, :128], findings)
    with pytest.raises(ValueError, match="number segments"):
        build(film, masks, findings[:2])
    uncategorised = [
        findings[0].model_copy(
            update={"label": findings[0].label.model_copy(update={"category": None})}
        ),
        *findings[1:],
    ]
    with pytest.raises(ValueError, match="no category"):
        build(film, masks, uncategorised)
