"""Findings drawn over the source images by the viewer: a Grayscale Softcopy Presentation
State (GSPS), for PACS that show neither SEG nor SR but apply presentation states.

A pure builder like the SR, SEG and Secondary Capture ones: the headers of source images
(no pixels) with what to draw on each, and the engine, in; a highdicom
`GrayscaleSoftcopyPresentationState` out. Unlike the Secondary Capture it copies no pixels
and burns nothing in: the reader sees the original image, can hide the annotations, and the
findings stay where they were found, to the pixel. What is drawn, in PIXEL units (0,0 the
top-left corner of the top-left pixel):

- a segmenter's masks as their outlines: closed POLYLINEs along the pixel edges between
  inside and outside, at most 1000 points each and 32 per label and frame (`outline.py`);
- a detector's boxes as closed POLYLINE rectangles, on every frame of a multi-frame image
  the finding spans (Referenced Frame Number), as the detector's SR draws them;
- a line of text per finding with its probability ("Pneumothorax 0.93, 12% of
  hemithorax", "Mammographic breast mass 0.90"), a line from it to the outline; a
  classifier's verdict ("Abnormal 0.99 (not ruled out at rule_out 0.47)") or "nothing
  segmented" / "no mass reported" as text under the notice;
- on every image (every frame), the notice: "cadnode <engine> <version> - AI result, not
  for primary diagnosis", on its own layer drawn last.

A graphic layer per label, coloured (CIELab) as the Secondary Capture colours it, and white
as the grayscale value (DCMTK-based viewers read only that one). The image shows as its
source would: rescale, first window (else first VOI LUT) and polarity are copied
(`display.py`). It says what it is: Content Label the engine, Content and Series
Description "... annotations, not for primary diagnosis", the engine as contributing
equipment, its model hash as the device serial number.

One presentation state shows images of one series that share size, polarity and rescale
(a multi-frame image alone): `presentation_groups` splits the images so, and the caller
makes one object per group. Deterministic: UIDs come from the caller (highdicom draws none
for a GSPS; the tests check it) and `content_datetime` replaces the clock, so the same
inputs give the same bytes.

Modules:

- outline.py: a mask's outlines as closed polylines on the pixel edges, bounded in size
- content.py: what is drawn (`Mark`, `Layer`, `Annotated`), from the engines' answers, and
  where text goes
- display.py: the source's rescale, VOI and polarity, as the presentation state gives them
- sop.py: the GSPS, its layers and annotations, and the grouping of images
"""

from cadnode.encode.pr.content import (
    Annotated,
    Layer,
    Mark,
    classification_marks,
    detection_marks,
    segmentation_marks,
)
from cadnode.encode.pr.outline import outlines
from cadnode.encode.pr.sop import (
    PR_SERIES_NUMBER,
    notice,
    presentation_groups,
    presentation_state,
)

__all__ = [
    "PR_SERIES_NUMBER",
    "Annotated",
    "Layer",
    "Mark",
    "classification_marks",
    "detection_marks",
    "notice",
    "outlines",
    "presentation_groups",
    "presentation_state",
    "segmentation_marks",
]
