"""Engines' answers as DICOM TID 1500 Measurement Reports (Comprehensive 3D SR).

Pure builders: datasets and answers in, a `highdicom.sr.Comprehensive3DSR` out. They read no
files, touch no database and make no UIDs of their own beyond ones derived from their
inputs. Only the clock differs between two builds: highdicom stamps Content Date/Time,
Instance Creation Date/Time and its own Contributing Equipment entry with the current time;
pass `content_datetime` (e.g. when the engine answered) and all of them take that value,
so the same inputs give the same bytes and rebuilding a report after a crash reproduces
the object its UID names (`cadnode.encode.provenance.finish`).

The layout follows IHE AI Results (AIR): one TID 1500 report per study and engine, whose
observer is the engine (a device), whose evidence lists every source image (and the SEGs it
references), and whose measurement groups say what the engine found:

- classifier (`classification_report`): one TID 1501 group per source image holding the
  TID 4108 tracking identifier, the source image (DCM 121112 "Source of Measurement"), the
  finding (DCM 121071) = the label, e.g. SCT 263654008 "Abnormal", or SCT 17621005
  "Normal" when the film was ruled out, and the label's probability as TID 300
  measurement DCM 122157 "Probability", UCUM "1".
- segmenter (`segmentation_report`): per source image and label one TID 1410 planar ROI
  group (TID 1411 volumetric for a multi-frame source) whose ROI is the label's SEG segment
  (Referenced Segmentation Frame / Referenced Segment): the finding is the label (e.g. SCT
  36118008 "Pneumothorax"), a qualitative evaluation says it is SCT "Present" or "Absent",
  and its measurements are its area (SCT 42798000 "Area", UCUM mm2, from the image's pixel
  spacing), for pneumothorax its percent of the hemithorax (UCUM %) and the highest pixel
  probability. Every measurement of a group is of the group's segment, so each references
  its segment. The lung fields get their areas too.
- DBT detector (`detection_report`): one TID 1410 group per finding whose ROI is a closed
  POLYLINE rectangle (SCOORD) on the frame where it scores highest (SR SCOORD has no
  rectangle type; TID 1410 takes a closed polyline), with its probability, whose source of
  measurement lists every frame the finding spans (its slice span). A volume without a
  finding gets a TID 1501 group on the volume saying the label is "Absent".

Where the operating point and threshold go: they are parameters of the decision, so they
are TID 4019 "Algorithm Parameters" (DCM 111002) of the algorithm identification on the
measurement group, the part of the report the decision (the finding) belongs to, written
`operating_point=<name>` and `threshold=<value>` next to `sha256=<model hash>`. TID 4019 is
the template the standard gives for how an algorithm was run, and a reader finds these
with `AlgorithmIdentification.parameters`. The probability measurement carries its own
TID 4019 with only the model hash, because the probability does not depend on the
threshold. A second NUM "Threshold" would need an ad-hoc concept (TID 300 has no row for
it) and "CAD Operating Point" (DCM 111071) means an index into an operating-point table
in the CAD SR templates, not a probability cut-off.

Percent of the hemithorax has no standard concept; it is coded in cadnode's private coding
scheme 99CADNODE, which the report declares in its Coding Scheme Identification Sequence.

Modules, as in every builder here (`seg`, `sc` too):

- codes.py: the coded concepts the reports name, and the private coding scheme
- content.py: the answers a report is built from, where it goes (`ReportIdentity`), and
  its measurement groups, with the checks on what they say
- sop.py: the three reports and the SR document around their groups
"""

from cadnode.encode.provenance import MANUFACTURER, Algorithm, CodedLabel
from cadnode.encode.sr.codes import PERCENT_OF_HEMITHORAX, PRIVATE_SCHEME
from cadnode.encode.sr.content import (
    SR_SERIES_NUMBER,
    Classification,
    Detection,
    ReportIdentity,
    Segmented,
)
from cadnode.encode.sr.sop import (
    classification_report,
    detection_report,
    segmentation_report,
    warm_up,
)

__all__ = [
    "MANUFACTURER",
    "PERCENT_OF_HEMITHORAX",
    "PRIVATE_SCHEME",
    "SR_SERIES_NUMBER",
    "Algorithm",
    "Classification",
    "CodedLabel",
    "Detection",
    "ReportIdentity",
    "Segmented",
    "classification_report",
    "detection_report",
    "segmentation_report",
    "warm_up",
]
