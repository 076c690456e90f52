"""Findings burned into a picture: a Secondary Capture for PACS that cannot show SEG or SR.

A pure builder like the SR and SEG ones: the source image, what to draw (masks, boxes) and
the engine in; a highdicom `SCImage` out, RGB, drawn by `cadnode.encode.overlay` on the frame the
findings are on. It says what it is everywhere a reader or a PACS looks: Image Type
DERIVED\\SECONDARY, Burned In Annotation YES, a series description and a caption burned into
the picture naming the engine and version and that it is an AI result not for primary
diagnosis, a Derivation Description, and a Source Image Sequence pointing at the image it
was drawn on. UIDs come from the caller and `content_datetime` replaces the clock, so the
same inputs give the same bytes.

The object is in sop.py (with what it says of its source: orientation, laterality, the
frame it was drawn on); it has no parts or codes of its own, so no content.py or codes.py.
"""

from cadnode.encode.sc.sop import SC_SERIES_NUMBER, capture_caption, secondary_capture

__all__ = ["SC_SERIES_NUMBER", "capture_caption", "secondary_capture"]
