"""A SEG's parts: the description of each segment."""

from __future__ import annotations

import highdicom as hd
from pydicom.uid import generate_uid

from cadnode.encode.provenance import Algorithm, concept
from cadnode.infer.answers import SegmentFinding


def segment_description(
    finding: SegmentFinding, algorithm: Algorithm, sop_instance_uid: str
) -> hd.seg.SegmentDescription:
    """The segment of `finding`'s label in the SEG `sop_instance_uid`: its number, label,
    category and type, the engine, and a tracking UID derived from the SEG's.

    The label must have a category (`segmentation` refuses one without)."""
    label = finding.label
    assert label.category is not None  # segmentation's mask checks refused it
    present = finding.operating_points.get("present")
    parameters = {"threshold": repr(present.threshold)} if present is not None else {}
    return hd.seg.SegmentDescription(
        segment_number=finding.segment_number,
        segment_label=label.name.replace("_", " "),
        segmented_property_category=concept(label.category),
        segmented_property_type=concept(label.code),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.for_seg(**parameters),
        tracking_uid=generate_uid(
            entropy_srcs=["cadnode-segment", sop_instance_uid, str(finding.segment_number)]
        ),
        tracking_id=f"{algorithm.name} {label.name}",
    )
