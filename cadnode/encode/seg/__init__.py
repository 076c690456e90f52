"""A segmenter's masks as a DICOM Segmentation (highdicom `Segmentation`).

A pure builder like `cadnode.encode.sr`: one source image (a film, or a multi-frame volume),
its masks and the answer's findings in; a SEG out, with one segment per label numbered as
the answer numbers them (the manifest's label order), coded with the label's SNOMED CT
code and its category (DICOM CID 7150), identified by the engine's name, version and model
hash (family: Artificial Intelligence), and referencing the source image.

Binary, not fractional: the answer holds masks already cut at each label's pixel threshold
(the "present" operating point), which is what the measurements in the SR were taken on;
a fractional SEG would need the probability maps, which the answer does not keep, and a
binary SEG is bit-packed (an eighth of the size) and shown by every SEG-capable viewer.

Empty segments: highdicom leaves out frames with no segmented pixel. A label found nowhere
(a film without pneumothorax) would then be a segment without a frame, which a viewer
cannot show as "looked, found none" and the SR could not reference frame by frame. So
empty frames are left out only when every segment keeps at least one frame; otherwise all
frames are kept and the empty segment is an explicit empty mask.

LABELMAP on request (`labelmap=True`, Supplement 243): one frame per source frame whose pixel
values are segment numbers, for viewers that want a label image. A pixel has one value, so
where masks overlap the highest segment number wins; the binary SEG stays the lossless one,
the one the SR references.

Loadable by cornerstone3D (OHIF): a volume's SEG carries the volume's Frame of Reference and
plane geometry; a film's has no Frame of Reference (the film has none) but a Plane Orientation,
which the standard provides for only with one and the viewer requires (sop.py says why).
tests/viewers/ loads both with the adapter OHIF uses.

Deterministic: UIDs come from the caller, highdicom's random Dimension Organization UID is
replaced by one derived from the SEG's own UID, and `content_datetime` replaces the clock.

Modules:

- content.py: one segment's description (label, category, algorithm, tracking)
- sop.py: the SEG itself (binary or LABELMAP, its spatial attributes), and which of its
  frames hold a segment
"""

from cadnode.encode.seg.sop import SEG_SERIES_NUMBER, segment_frames, segmentation

__all__ = ["SEG_SERIES_NUMBER", "segment_frames", "segmentation"]
