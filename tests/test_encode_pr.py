"""The Grayscale Softcopy Presentation State: findings as graphic annotations over the source.

Outlines are checked against the masks they outline (every point a corner on the mask's
boundary, the traced area the mask's own), boxes against the answer (corners exact, on the
frames the finding spans), text and layers by reading the object back (pydicom: highdicom
0.28 builds presentation states but has no reader for them). DCMTK checks the rest:
`dciodvfy` the IOD, `dcmpschk` the presentation state's own rules, and `dcmp2pgm` applies it
to the source image: the picture must be the one the image gives alone (rescale, window or
VOI LUT, polarity copied), and DCMTK's own listing of what is drawn must match ours.
`dcmp2pgm` draws no graphic annotation into its bitmap (it renders VOI, shutters and
overlays only), so no pixel can show the outlines.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid

from cadnode.encode.pr import (
    Annotated,
    classification_marks,
    detection_marks,
    notice,
    outlines,
    presentation_groups,
    presentation_state,
    segmentation_marks,
)
from cadnode.encode.pr.outline import MAX_OUTLINES, MAX_POINTS, area, trace
from cadnode.encode.provenance import Algorithm
from cadnode.infer.answers import Box, SegmentAnswer
from tests.answer_cases import ruleout_answer
from tests.dicom_validation import assert_valid, require_tool, saved
from tests.encode_cases import (
    DETECTOR,
    SEGMENTER,
    detect_answer,
    film_with_masks,
    segment_answer,
    volume,
)
from tests.test_encode_charsets import EXAMPLES, Example, assert_kept, film_in, written

WHEN = dt.datetime(2026, 1, 2, 9, 30, 0)
CLASSIFIER = Algorithm(name="cxr-ruleout", version="0.1.0", sha256="ef" * 32)


def uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["test-encode-pr", *parts])


def build(annotated: Sequence[Annotated], algorithm: Algorithm) -> pydicom.Dataset:
    first = str(annotated[0].source.SOPInstanceUID)
    return presentation_state(
        annotated,
        algorithm,
        series_instance_uid=uid("pr-series"),
        sop_instance_uid=uid("pr", first),
        content_datetime=WHEN,
    )


def read_back(pr: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(saved(pr, path))


def film_pr(
    tmp_path: Path, *, pneumothorax: bool = True
) -> tuple[pydicom.Dataset, np.ndarray, SegmentAnswer, pydicom.Dataset]:
    """A film, its masks (frames, labels, rows, columns), its segmenter answer and its
    presentation state as read back."""
    film, masks = film_with_masks(tmp_path, pneumothorax=pneumothorax)
    answer = segment_answer(film, masks, "masks.npz")
    pr = build([Annotated(film, segmentation_marks(answer, masks))], SEGMENTER)
    return film, masks, answer, read_back(pr, tmp_path / "film-pr.dcm")


def annotations_on(pr: pydicom.Dataset, layer: str) -> list[pydicom.Dataset]:
    return [a for a in pr.GraphicAnnotationSequence if a.GraphicLayer == layer]


def points(graphic: pydicom.Dataset) -> np.ndarray:
    return np.asarray(graphic.GraphicData, dtype=float).reshape(-1, 2)


def texts(pr: pydicom.Dataset) -> list[str]:
    return [
        text.UnformattedTextValue
        for annotation in pr.GraphicAnnotationSequence
        for text in annotation.get("TextObjectSequence", [])
    ]


def on_boundary(mask: np.ndarray, corners: np.ndarray) -> bool:
    """Each (column, row) corner touches a pixel inside the mask and one outside it (or the
    image's edge): it lies on the mask's boundary."""
    padded = np.pad(mask, 1)
    for column, row in corners.astype(int):
        around = padded[row : row + 2, column : column + 2]  # the 4 pixels at the corner
        if around.all() or not around.any():
            return False
    return True


def enclosed(polyline: np.ndarray) -> float:
    """Signed area of a closed (column, row) polyline, as `outline.area` counts it."""
    return area(polyline[:-1, ::-1])


# --- outlines -----------------------------------------------------------------------------


def test_outlines_follow_the_pixel_edges_exactly(tmp_path: Path) -> None:
    """Unsimplified, the loops enclose exactly the mask's pixels (holes subtracted), and
    every corner is on the boundary, for phantom lungs and pneumothorax and for noise."""
    _, phantom = film_with_masks(tmp_path, pneumothorax=True)
    rng = np.random.default_rng(7)
    noise = [rng.random((40, 50)) > threshold for threshold in (0.3, 0.5, 0.7)]
    ring = np.zeros((9, 9), dtype=bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False
    for mask in [*phantom[0], *noise, ring, np.ones((4, 4), dtype=bool)]:
        loops = trace(mask)
        assert sum(area(loop) for loop in loops) == mask.sum()
        for loop in loops:
            assert on_boundary(mask, loop[:, ::-1])


def test_diagonal_neighbours_and_holes_get_their_own_outlines() -> None:
    diagonal = np.zeros((4, 4), dtype=bool)
    diagonal[1, 1] = diagonal[2, 2] = True
    squares = outlines(diagonal)
    assert [p.tolist() for p in squares] == [
        [[1, 1], [2, 1], [2, 2], [1, 2], [1, 1]],
        [[2, 2], [3, 2], [3, 3], [2, 3], [2, 2]],
    ]
    ring = np.zeros((9, 9), dtype=bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False
    outer, hole = outlines(ring)
    assert (enclosed(outer), enclosed(hole)) == (49.0, -9.0)


def test_outlines_are_bounded_and_stay_on_the_boundary() -> None:
    rows, columns = np.mgrid[:2000, :2000]
    disc = (rows - 1000) ** 2 + (columns - 990) ** 2 < 900**2
    [outline] = outlines(disc)
    assert 8 < len(outline) <= MAX_POINTS
    assert outline[0].tolist() == outline[-1].tolist()  # closed
    assert on_boundary(disc, outline)
    assert enclosed(outline) == pytest.approx(disc.sum(), rel=0.002)
    tight = outlines(disc, max_points=50)[0]
    assert len(tight) <= 50 and on_boundary(disc, tight)
    noise = np.random.default_rng(1).random((300, 300)) > 0.5
    many = outlines(noise)
    assert len(many) == MAX_OUTLINES
    sizes = [abs(enclosed(o)) for o in many]
    assert sizes == sorted(sizes, reverse=True)  # the largest kept


# --- a segmenter's film -------------------------------------------------------------------


def test_the_masks_are_outlined_on_the_film(tmp_path: Path) -> None:
    film, masks, answer, pr = film_pr(tmp_path)
    assert pr.SOPClassUID == pydicom.uid.GrayscaleSoftcopyPresentationStateStorage
    assert pr.Modality == "PR" and pr.StudyInstanceUID == film.StudyInstanceUID
    assert [layer.GraphicLayer for layer in pr.GraphicLayerSequence] == [
        "RIGHT_LUNG",
        "LEFT_LUNG",
        "PNEUMOTHORAX",
        "CADNODE",
    ]
    for index, layer in enumerate(("RIGHT_LUNG", "LEFT_LUNG", "PNEUMOTHORAX")):
        [annotation] = annotations_on(pr, layer)
        [image] = annotation.ReferencedImageSequence
        assert image.ReferencedSOPInstanceUID == film.SOPInstanceUID
        assert "ReferencedFrameNumber" not in image  # a single-frame film
        mask = masks[0, index]
        graphics = annotation.GraphicObjectSequence
        for graphic in graphics:
            assert (graphic.GraphicType, graphic.GraphicAnnotationUnits) == ("POLYLINE", "PIXEL")
            assert graphic.GraphicFilled == "N"
            outline = points(graphic)
            assert outline[0].tolist() == outline[-1].tolist()
            assert on_boundary(mask, outline)
        # The outlines enclose the mask's area, within the half-pixel simplification.
        assert sum(enclosed(points(g)) for g in graphics) == pytest.approx(mask.sum(), rel=0.03)
        [text] = annotation.TextObjectSequence
        assert text.AnchorPointAnnotationUnits == "PIXEL" and text.AnchorPointVisibility == "Y"
        assert on_boundary(mask, np.array([text.AnchorPoint]))  # it points at the outline
        assert text.BoundingBoxAnnotationUnits == "PIXEL"
    ptx = answer.findings[2]
    share = ptx.measurements["percent_of_hemithorax"]
    assert texts(pr)[0] == notice(SEGMENTER)
    assert f"Pneumothorax {ptx.probability:.2f}, {share:.0f}% of hemithorax" in texts(pr)
    assert "Right lung 0.93" in texts(pr)


def test_it_says_what_it_is(tmp_path: Path) -> None:
    _, _, _, pr = film_pr(tmp_path)
    assert notice(SEGMENTER) == "cadnode cxr-segmenter 0.1.0 - AI result, not for primary diagnosis"
    [annotation] = annotations_on(pr, "CADNODE")
    assert "GraphicObjectSequence" not in annotation
    [text] = annotation.TextObjectSequence
    assert text.UnformattedTextValue == notice(SEGMENTER)
    assert text.BoundingBoxTopLeftHandCorner == [0, 0]
    assert pr.SeriesDescription.endswith("not for primary diagnosis")
    assert pr.ContentDescription == pr.SeriesDescription
    assert (pr.ContentLabel, pr.SeriesNumber) == ("CXR_SEGMENTER", 903)
    assert pr.ManufacturerModelName == "cadnode cxr-segmenter"
    engine = pr.ContributingEquipmentSequence[-1]
    assert (engine.ManufacturerModelName, engine.SoftwareVersions) == ("cxr-segmenter", "0.1.0")
    # Layers come in colour (CIELab) and as white for a grayscale display; the notice last.
    layers = {layer.GraphicLayer: layer for layer in pr.GraphicLayerSequence}
    assert all(
        len(layer.GraphicLayerRecommendedDisplayCIELabValue) == 3 for layer in layers.values()
    )
    assert {layer.GraphicLayerRecommendedDisplayGrayscaleValue for layer in layers.values()} == {
        0xFFFF
    }
    assert layers["CADNODE"].GraphicLayerOrder == len(layers)
    assert layers["PNEUMOTHORAX"].GraphicLayerDescription == "cxr-segmenter: Pneumothorax"


def test_a_film_without_pneumothorax_outlines_the_lungs_only(tmp_path: Path) -> None:
    _, _, _, pr = film_pr(tmp_path, pneumothorax=False)
    assert [layer.GraphicLayer for layer in pr.GraphicLayerSequence] == [
        "RIGHT_LUNG",
        "LEFT_LUNG",
        "CADNODE",
    ]


def test_nothing_found_is_said_in_text(tmp_path: Path) -> None:
    source, _ = volume(tmp_path, masses=0)
    pr = build([Annotated(source, detection_marks(detect_answer(source, [])))], DETECTOR)
    assert texts(pr) == [notice(DETECTOR), "no mass reported"]
    [verdict] = annotations_on(pr, "VERDICT")
    assert "GraphicObjectSequence" not in verdict


# --- a detector's volume ------------------------------------------------------------------


def test_boxes_are_drawn_on_the_frames_they_span(tmp_path: Path) -> None:
    source, boxes = volume(tmp_path, masses=2, seed=6)
    answer = detect_answer(source, boxes)
    pr = read_back(build([Annotated(source, detection_marks(answer))], DETECTOR), tmp_path / "p")
    [notice_annotation] = annotations_on(pr, "CADNODE")
    assert "ReferencedFrameNumber" not in notice_annotation.ReferencedImageSequence[0]
    drawn = annotations_on(pr, "MASS")
    assert len(drawn) == len(answer.findings) == 2
    for annotation, finding in zip(drawn, answer.findings, strict=True):
        box = finding.box
        [image] = annotation.ReferencedImageSequence
        assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
        frames = [int(f) for f in image.ReferencedFrameNumber]
        assert frames == list(range(box.first_frame, box.first_frame + box.depth))
        assert box.frame in frames
        [graphic] = annotation.GraphicObjectSequence
        left, top, right, bottom = box.x, box.y, box.x + box.width, box.y + box.height
        assert points(graphic).tolist() == [
            [left, top],
            [right, top],
            [right, bottom],
            [left, bottom],
            [left, top],
        ]
        [text] = annotation.TextObjectSequence
        assert text.UnformattedTextValue == f"Mammographic breast mass {finding.probability:.2f}"
        assert list(text.AnchorPoint) == [left, top]


# --- a classifier's film ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probability", "said"),
    [
        (0.99, "Abnormal 0.99 (not ruled out at rule_out 0.47)"),
        (0.12, "Abnormal 0.12 (ruled out at rule_out 0.47)"),
    ],
)
def test_a_classifier_verdict_is_text(tmp_path: Path, probability: float, said: str) -> None:
    film, _ = film_with_masks(tmp_path, pneumothorax=False)
    pr = build([Annotated(film, classification_marks(ruleout_answer(probability)))], CLASSIFIER)
    assert texts(pr) == [notice(CLASSIFIER), said]
    [verdict] = annotations_on(pr, "ABNORMAL")
    assert "GraphicObjectSequence" not in verdict
    # Under the notice, not over it.
    [notice_text] = annotations_on(pr, "CADNODE")[0].TextObjectSequence
    [verdict_text] = verdict.TextObjectSequence
    assert (
        verdict_text.BoundingBoxTopLeftHandCorner[1]
        >= notice_text.BoundingBoxBottomRightHandCorner[1]
    )


# --- the same object every time -----------------------------------------------------------


def test_same_inputs_same_bytes_and_no_uid_of_its_own(tmp_path: Path) -> None:
    film, masks = film_with_masks(tmp_path, pneumothorax=True)
    answer = segment_answer(film, masks, "masks.npz")
    marks = segmentation_marks(answer, masks)
    first = saved(build([Annotated(film, marks)], SEGMENTER), tmp_path / "1.dcm").read_bytes()
    again = saved(build([Annotated(film, marks)], SEGMENTER), tmp_path / "2.dcm").read_bytes()
    assert first == again
    pr = pydicom.dcmread(tmp_path / "1.dcm")
    given = {uid("pr-series"), uid("pr", str(film.SOPInstanceUID))}
    sources = {str(film.SOPInstanceUID), str(film.SeriesInstanceUID), str(film.StudyInstanceUID)}
    for found in _uids(pr) | _uids(pr.file_meta):
        assert found in given | sources or found.startswith("1.2.840.10008."), found
    assert pr.PresentationCreationDate == "20260102" and pr.InstanceCreationTime == "093000"


def _uids(ds: pydicom.Dataset) -> set[str]:
    found: set[str] = set()
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                found |= _uids(item)
        elif element.VR == "UI" and element.keyword != "ImplementationClassUID":
            found.add(str(element.value))
    return found


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_text_from_sources_in_any_character_set(tmp_path: Path, example: Example) -> None:
    film, masks = film_in(tmp_path, example)
    answer = segment_answer(film, masks, "masks.npz")
    pr = build([Annotated(film, segmentation_marks(answer, masks))], SEGMENTER)
    assert_kept(written(pr, tmp_path / "pr.dcm"), example)


# --- showing the image as its source does -------------------------------------------------


def test_the_window_and_rescale_are_the_films(tmp_path: Path) -> None:
    film, _, _, pr = film_pr(tmp_path)
    [voi] = pr.SoftcopyVOILUTSequence
    assert (voi.WindowCenter, voi.WindowWidth) == (film.WindowCenter, film.WindowWidth)
    assert "ReferencedImageSequence" not in voi  # it applies to every image
    assert (pr.RescaleSlope, pr.RescaleIntercept) == (film.RescaleSlope, film.RescaleIntercept)
    assert pr.PresentationLUTShape == "IDENTITY"


def test_a_monochrome1_film_is_shown_inverted(tmp_path: Path) -> None:
    film = monochrome1(film_with_masks(tmp_path, pneumothorax=False)[0])
    pr = build([Annotated(film, ())], SEGMENTER)
    assert pr.PresentationLUTShape == "INVERSE"


def test_a_12_bit_voi_lut_is_widened_to_16_bits(tmp_path: Path) -> None:
    film = with_voi_lut(film_with_masks(tmp_path, pneumothorax=False)[0], bits=12)
    pr = read_back(build([Annotated(film, ())], SEGMENTER), tmp_path / "lut.dcm")
    [voi] = pr.SoftcopyVOILUTSequence
    assert "WindowCenter" not in voi
    [lut] = voi.VOILUTSequence
    assert list(lut.LUTDescriptor) == [4096, 0, 16]
    widened = np.frombuffer(lut.LUTData, dtype="<u2")
    source = np.asarray(film.VOILUTSequence[0].LUTData, dtype=float)
    assert np.array_equal(widened, np.round(source * 65535 / 4095))
    assert lut.LUTExplanation == "gamma"


def test_a_window_is_taken_over_a_voi_lut(tmp_path: Path) -> None:
    film = with_voi_lut(film_with_masks(tmp_path, pneumothorax=False)[0], bits=16)
    film.WindowCenter, film.WindowWidth = [1000, 3000], [2000, 6000]  # the first is shown
    [voi] = build([Annotated(film, ())], SEGMENTER).SoftcopyVOILUTSequence
    assert (voi.WindowCenter, voi.WindowWidth) == (1000, 2000)
    assert "VOILUTSequence" not in voi


def test_films_of_one_series_keep_their_own_windows(tmp_path: Path) -> None:
    first, _ = film_with_masks(tmp_path, pneumothorax=False, seed=3)
    second, _ = film_with_masks(tmp_path, pneumothorax=False, seed=4)
    second.SeriesInstanceUID, second.StudyInstanceUID = (
        first.SeriesInstanceUID,
        first.StudyInstanceUID,
    )
    second.WindowCenter = 1500
    annotated = [Annotated(first, ()), Annotated(second, ())]
    assert len(presentation_groups(annotated)) == 1
    pr = build(annotated, SEGMENTER)
    windows = {
        str(voi.ReferencedImageSequence[0].ReferencedSOPInstanceUID): float(voi.WindowCenter)
        for voi in pr.SoftcopyVOILUTSequence
    }
    assert windows == {str(first.SOPInstanceUID): 2000.0, str(second.SOPInstanceUID): 1500.0}
    [series] = pr.ReferencedSeriesSequence
    assert len(series.ReferencedImageSequence) == 2


def test_frames_keep_their_own_windows(tmp_path: Path) -> None:
    source, _ = volume(tmp_path, masses=0)
    shared = source.SharedFunctionalGroupsSequence[0]
    del shared.FrameVOILUTSequence
    for index, frame in enumerate(source.PerFrameFunctionalGroupsSequence):
        item = pydicom.Dataset()
        item.WindowCenter, item.WindowWidth = (1000 if index < 4 else 2000), 4000
        frame.FrameVOILUTSequence = [item]
    pr = build([Annotated(source, ())], DETECTOR)
    frames = {
        float(voi.WindowCenter): [
            int(f) for f in voi.ReferencedImageSequence[0].ReferencedFrameNumber
        ]
        for voi in pr.SoftcopyVOILUTSequence
    }
    assert frames == {1000.0: [1, 2, 3, 4], 2000.0: list(range(5, 17))}


def test_a_rescale_repeated_per_frame_is_taken_and_differing_ones_refused(tmp_path: Path) -> None:
    source, _ = volume(tmp_path, masses=0)
    rescale = source.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    del source.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    for frame in source.PerFrameFunctionalGroupsSequence:
        frame.PixelValueTransformationSequence = copy.deepcopy(rescale)
    pr = build([Annotated(source, ())], DETECTOR)
    assert (pr.RescaleSlope, pr.RescaleIntercept, pr.RescaleType) == (1, 0, "US")
    source.PerFrameFunctionalGroupsSequence[3].PixelValueTransformationSequence[0].RescaleSlope = 2
    with pytest.raises(ValueError, match="different rescales"):
        build([Annotated(source, ())], DETECTOR)


def test_images_are_grouped_as_one_presentation_state_can_show_them(tmp_path: Path) -> None:
    first, _ = film_with_masks(tmp_path, pneumothorax=False, seed=3)
    other_series, _ = film_with_masks(tmp_path, pneumothorax=False, seed=4)
    inverted = monochrome1(copy.deepcopy(first))
    inverted.SOPInstanceUID = uid("inverted")
    vol, _ = volume(tmp_path, masses=0)
    for ds in (other_series, inverted, vol):
        ds.StudyInstanceUID, ds.PatientID = first.StudyInstanceUID, first.PatientID
    annotated = [Annotated(ds, ()) for ds in (first, other_series, inverted, vol)]
    groups = presentation_groups(annotated)
    assert [[item.source for item in group] for group in groups] == [
        [first],
        [other_series],
        [inverted],
        [vol],
    ]
    with pytest.raises(ValueError, match="more than one presentation state"):
        build(annotated[:2], SEGMENTER)


# --- DCMTK: dciodvfy, dcmpschk, dcmp2pgm --------------------------------------------------


def test_the_films_presentation_state_passes_dcmtk(tmp_path: Path) -> None:
    film, _, _, pr = film_pr(tmp_path)
    pr_path = assert_valid(tmp_path / "film-pr.dcm")
    assert_pschk_passes(pr_path)
    image = saved(film, tmp_path / "film.dcm")
    assert render(image, pr_path) == render(image)  # shown as the film shows itself
    # DCMTK reads back what we drew, layer by layer, point by point.
    listed = dcmtk_listing(image, pr_path)
    ours = {
        layer.GraphicLayer: [
            points(g).tolist()
            for a in annotations_on(pr, layer.GraphicLayer)
            for g in a.get("GraphicObjectSequence", [])
        ]
        for layer in pr.GraphicLayerSequence
    }
    assert listed == ours


def test_the_volumes_presentation_state_passes_dcmtk(tmp_path: Path) -> None:
    source, boxes = volume(tmp_path, masses=2, seed=6)
    # A third finding on frames 1 and 2: DCMTK lists what is drawn on frame 1 only.
    on_first = Box(x=10.0, y=12.0, width=20.0, height=16.0, frame=1, first_frame=1, depth=2)
    answer = detect_answer(source, [*boxes, on_first])
    pr_path = saved(build([Annotated(source, detection_marks(answer))], DETECTOR), tmp_path / "p")
    assert_valid(pr_path)
    assert_pschk_passes(pr_path)
    image = saved(source, tmp_path / "volume.dcm")
    # DCMTK 3.6.7 reads no window from functional groups: alone it shows the volume
    # unwindowed. With the frames' window given at the top level it windows as the volume
    # asks, and so must the presentation state.
    windowed = copy.deepcopy(source)
    frame_window = source.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    windowed.WindowCenter, windowed.WindowWidth = (
        frame_window.WindowCenter,
        frame_window.WindowWidth,
    )
    as_asked = saved(windowed, tmp_path / "windowed.dcm")
    best = answer.best_frame()
    assert render(image, pr_path, frame=best) == render(as_asked, frame=best)
    listed = dcmtk_listing(image, pr_path)
    assert listed["MASS"] == [[[10, 12], [30, 12], [30, 28], [10, 28], [10, 12]]]


@pytest.mark.parametrize("variant", ["monochrome1", "voi-lut-12-bit", "voi-lut-16-bit"])
def test_dcmtk_shows_the_film_as_it_shows_itself(tmp_path: Path, variant: str) -> None:
    film, _ = film_with_masks(tmp_path, pneumothorax=False)
    if variant == "monochrome1":
        film = monochrome1(film)
    else:
        film = with_voi_lut(film, bits=int(variant.split("-")[2]))
    pr_path = assert_valid(saved(build([Annotated(film, ())], SEGMENTER), tmp_path / "pr.dcm"))
    assert_pschk_passes(pr_path)
    image = saved(film, tmp_path / "film.dcm")
    assert render(image, pr_path) == render(image)


# --- helpers ------------------------------------------------------------------------------


def monochrome1(film: pydicom.Dataset) -> pydicom.Dataset:
    """The film as a MONOCHROME1 image (bright = low values), as CR films often are."""
    film.PhotometricInterpretation = "MONOCHROME1"
    film.PresentationLUTShape = "INVERSE"
    return film


def with_voi_lut(film: pydicom.Dataset, *, bits: int) -> pydicom.Dataset:
    """The film with a gamma VOI LUT of `bits`-bit entries instead of its window."""
    del film.WindowCenter, film.WindowWidth
    entries = 4096
    top = (1 << bits) - 1
    lut = pydicom.Dataset()
    lut.LUTDescriptor = [entries, 0, bits]
    lut.LUTExplanation = "gamma"
    values = [round(top * (i / (entries - 1)) ** 0.5) for i in range(entries)]
    lut["LUTData"] = DataElement(0x00283006, "US", values)
    film.VOILUTSequence = [lut]
    return film


def assert_pschk_passes(path: Path) -> None:
    """dcmpschk finds nothing wrong: it exits 0 either way, so its verdict is read."""
    done = subprocess.run(
        [require_tool("dcmpschk"), str(path)], capture_output=True, text=True, timeout=60
    )
    said = done.stdout + done.stderr
    assert done.returncode == 0 and "Test passed" in said and "failed" not in said, said


def render(image: Path, pr: Path | None = None, *, frame: int = 1) -> bytes:
    """The PGM bitmap dcmp2pgm makes of the image's frame, with the presentation state."""
    out = image.with_name(f"{image.stem}-{pr.stem if pr else 'plain'}-{frame}.pgm")
    command = [require_tool("dcmp2pgm"), "--frame", str(frame)]
    command += ["--pstate", str(pr)] if pr else []
    done = subprocess.run(
        [*command, str(image), str(out)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out.read_bytes()


def dcmtk_listing(image: Path, pr: Path) -> dict[str, list[list[list[float]]]]:
    """What dcmp2pgm lists (verbose) as drawn on the image's first frame: per layer, each
    graphic object's points."""
    done = subprocess.run(
        [require_tool("dcmp2pgm"), "--verbose", "--pstate", str(pr), str(image)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    listed: dict[str, list[list[list[float]]]] = {}
    layer = ""
    for line in (done.stdout + done.stderr).splitlines():
        if found := re.search(r"Graphic Layer #\d+ \[(.*)\]", line):
            layer = found.group(1)
            listed[layer] = []
        elif found := re.search(r"coordinates: (.*)", line):
            pairs = [pair.split("\\") for pair in found.group(1).strip(" ,").split(", ")]
            listed[layer].append([[float(x), float(y)] for x, y in pairs])
    return listed


def test_a_multi_frame_image_without_functional_groups(tmp_path: Path) -> None:
    """An ultrasound-like cine: window and rescale at the top level, frames without groups."""
    film, _ = film_with_masks(tmp_path, pneumothorax=False)
    film.SOPClassUID = pydicom.uid.UltrasoundMultiFrameImageStorage
    film.NumberOfFrames = 3
    pr = build([Annotated(film, ())], SEGMENTER)
    [voi] = pr.SoftcopyVOILUTSequence
    assert (voi.WindowCenter, voi.WindowWidth) == (film.WindowCenter, film.WindowWidth)
    assert pr.RescaleSlope == film.RescaleSlope
