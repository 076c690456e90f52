"""The Grayscale Softcopy Presentation State: the source images shown as they are, with the
findings drawn over them as graphic annotations, saying what it is."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Hashable, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.valuerep import DA, TM

import cadnode
from cadnode.encode.pr.content import (
    WHITE,
    Annotated,
    Layer,
    anchor_of,
    code_string,
    text_box,
    text_height,
)
from cadnode.encode.pr.display import (
    display_key,
    presentation_lut_shape,
    softcopy_voi,
    strip_display,
    write_modality_lut,
)
from cadnode.encode.provenance import (
    MANUFACTURER,
    NOT_FOR_DIAGNOSIS,
    Algorithm,
    check_sources,
    finish,
    source_header,
)

PR_SERIES_NUMBER = 903
PIXEL = hd.pr.AnnotationUnitsValues.PIXEL
# The notice layer's name: drawn last, over the findings.
NOTICE_LAYER = "CADNODE"


def notice(algorithm: Algorithm) -> str:
    """The line every annotated image carries, as the Secondary Capture's caption says it."""
    return f"cadnode {algorithm.name} {algorithm.version} - {NOT_FOR_DIAGNOSIS}"


def presentation_groups(annotated: Sequence[Annotated]) -> list[list[Annotated]]:
    """`annotated` split into what one presentation state can show: one series, one size,
    one polarity and rescale, and a multi-frame image alone (highdicom takes none among
    others). Groups keep the order of their first image; each is ready for
    `presentation_state`."""
    groups: dict[tuple[Hashable, ...], list[Annotated]] = defaultdict(list)
    for item in annotated:
        source = item.source
        alone = str(source.SOPInstanceUID) if "NumberOfFrames" in source else ""
        key = (str(source.SeriesInstanceUID), source.Rows, source.Columns, alone)
        groups[(*key, *display_key(source))].append(item)
    return list(groups.values())


def presentation_state(
    annotated: Sequence[Annotated],
    algorithm: Algorithm,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = PR_SERIES_NUMBER,
    instance_number: int = 1,
    content_datetime: dt.datetime | None = None,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """A GSPS over the source images of one group (`presentation_groups`): each image's marks
    as graphic and text objects in PIXEL units, a layer per finding label in its colour, and
    a notice layer naming the engine and saying it is not for primary diagnosis.

    Sources are headers (no pixels needed). Raises ValueError for sources one presentation
    state cannot show together (see `presentation_groups`), or marks outside their image.
    """
    sources = [item.source for item in annotated]
    check_sources(sources)
    if len(presentation_groups(annotated)) > 1:
        raise ValueError(
            "the images need more than one presentation state (series, size, polarity, "
            "rescale, or a multi-frame image among others): split with presentation_groups"
        )
    headers = [_referable(source) for source in sources]
    layers = _graphic_layers(annotated, algorithm)
    annotations = [
        annotation
        for item, header in zip(annotated, headers, strict=True)
        for annotation in _annotations(item, header, layers, algorithm)
    ]
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=headers,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.model_name,
        software_versions=cadnode.__version__,
        device_serial_number=algorithm.sha256[:64],
        content_label=code_string(algorithm.name),
        content_description=algorithm.series_description("annotations"),
        graphic_annotations=annotations,
        graphic_layers=list(layers.values()),
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=presentation_lut_shape(sources[0])
        ),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    _show_as_source(pr, sources)
    _describe_series(pr, sources)
    pr.SeriesDescription = algorithm.series_description("annotations")
    moment = content_datetime or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    pr.PresentationCreationDate, pr.PresentationCreationTime = DA(moment.date()), TM(moment.time())
    finish(pr, algorithm, moment)
    return pr


def _referable(source: pydicom.Dataset) -> pydicom.Dataset:
    """The header highdicom references and copies patient and study from: text in UTF-8
    (`source_header`), without the display values (written by `_show_as_source`)."""
    header = source_header(source)
    strip_display(header)
    if "NumberOfFrames" in header and "SharedFunctionalGroupsSequence" not in header:
        # A multi-frame image without functional groups (e.g. ultrasound): highdicom looks
        # for rescale and windows in them; empty ones say there are none.
        header.SharedFunctionalGroupsSequence = [pydicom.Dataset()]
        header.PerFrameFunctionalGroupsSequence = []
    return header


def _describe_series(pr: pydicom.Dataset, sources: list[pydicom.Dataset]) -> None:
    """The series' body part and side, as its images give them. The side (type 2C) is asked
    of a paired part: absent for an unpaired one (images saying U), else L or R where the
    images agree on one, else empty (unknown)."""
    parts = {str(source.get("BodyPartExamined", "")) for source in sources}
    if len(parts) == 1 and "" not in parts:
        pr.BodyPartExamined = parts.pop()
    sides = {_side(source) for source in sources}
    if sides != {"U"}:
        pr.Laterality = sides.pop() if len(sides) == 1 and sides != {""} else ""


def _side(source: pydicom.Dataset) -> str:
    """L, R or U (unpaired) from Laterality, Image Laterality or a multi-frame image's
    shared Frame Laterality; empty when not said (B, both, says no one side either)."""
    found = [str(source.get(keyword, "")) for keyword in ("Laterality", "ImageLaterality")]
    for item in source.get("SharedFunctionalGroupsSequence", [])[:1]:
        for anatomy in item.get("FrameAnatomySequence", []):
            found.append(str(anatomy.get("FrameLaterality", "")))
    return next((value for value in found if value in ("L", "R", "U")), "")


def _show_as_source(pr: pydicom.Dataset, sources: list[pydicom.Dataset]) -> None:
    write_modality_lut(pr, sources)
    voi = softcopy_voi(sources)
    if voi:
        pr.SoftcopyVOILUTSequence = voi


# --- layers and annotations ---------------------------------------------------------------


def _graphic_layers(
    annotated: Sequence[Annotated], algorithm: Algorithm
) -> dict[Layer | None, hd.pr.GraphicLayer]:
    """A graphic layer per finding layer, in order of first use, then the notice (None):
    unique DICOM names, each with a colour (CIELab) and white for grayscale displays."""
    found = list(dict.fromkeys(mark.layer for item in annotated for mark in item.marks))
    names: set[str] = {NOTICE_LAYER}
    layers: dict[Layer | None, hd.pr.GraphicLayer] = {}
    for order, layer in enumerate(found, start=1):
        name = _unique(code_string(layer.name), names)
        description = f"{algorithm.name}: {layer.description}"[:64]
        layers[layer] = _graphic_layer(name, order, description, layer.colour)
    description = f"{algorithm.name} {algorithm.version}: {NOT_FOR_DIAGNOSIS}"[:64]
    layers[None] = _graphic_layer(NOTICE_LAYER, len(found) + 1, description, WHITE)
    return layers


def _unique(name: str, taken: set[str]) -> str:
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        suffix = f"_{number}"
        candidate = name[: 16 - len(suffix)] + suffix
    taken.add(candidate)
    return candidate


def _graphic_layer(
    name: str, order: int, description: str, colour: tuple[int, int, int]
) -> hd.pr.GraphicLayer:
    layer = hd.pr.GraphicLayer(
        layer_name=name,
        order=order,
        description=description,
        display_color=hd.color.CIELabColor.from_rgb(*colour),
    )
    # A viewer on a grayscale display draws the layer in white: visible on most images.
    layer.GraphicLayerRecommendedDisplayGrayscaleValue = 0xFFFF
    return layer


def _annotations(
    item: Annotated,
    header: pydicom.Dataset,
    layers: dict[Layer | None, hd.pr.GraphicLayer],
    algorithm: Algorithm,
) -> list[hd.pr.GraphicAnnotation]:
    """The notice on every frame of the image, then each mark on its frames. Marks without
    outlines (a verdict) are lines of text under the notice."""
    rows, columns = int(header.Rows), int(header.Columns)
    line = text_height(rows, columns)
    said = notice(algorithm)
    notice_box = text_box(said, (0.0, 0.0), rows, columns, below=True)
    annotations = [_annotation(header, layers[None], (), [], [_text(said, notice_box)])]
    lines = 1
    for mark in item.marks:
        if mark.polylines:
            anchor = anchor_of(mark.polylines)
            box = text_box(mark.text, anchor, rows, columns)
            texts = [_text(mark.text, box, anchor)]
        else:
            box = text_box(mark.text, (0.0, lines * line), rows, columns, below=True)
            texts, lines = [_text(mark.text, box)], lines + 1
        graphics = [_polyline(points) for points in mark.polylines]
        annotations.append(_annotation(header, layers[mark.layer], mark.frames, graphics, texts))
    return annotations


def _annotation(
    header: pydicom.Dataset,
    layer: hd.pr.GraphicLayer,
    frames: tuple[int, ...],
    graphics: list[hd.pr.GraphicObject],
    texts: list[hd.pr.TextObject],
) -> hd.pr.GraphicAnnotation:
    return hd.pr.GraphicAnnotation(
        referenced_images=[header],
        graphic_layer=layer,
        referenced_frame_number=list(frames) or None,
        graphic_objects=graphics or None,
        text_objects=texts or None,
    )


def _polyline(points: np.ndarray) -> hd.pr.GraphicObject:
    return hd.pr.GraphicObject(
        graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=points, units=PIXEL
    )


def _text(
    text: str,
    box: tuple[float, float, float, float],
    anchor: tuple[float, float] | None = None,
) -> hd.pr.TextObject:
    """A line of text in its box; with an anchor, a visible line from the text to the
    finding it names."""
    return hd.pr.TextObject(
        text_value=text,
        units=PIXEL,
        bounding_box=box,
        anchor_point=anchor,
        text_justification=hd.pr.TextJustificationValues.LEFT,
        anchor_point_visible=anchor is not None,
    )
