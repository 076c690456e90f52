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
references), whose Image Library (TID 1600) describes every source image, and whose
measurement groups say what the engine found, each number saying what it is of:

- Image Library: one Image Library Group (OHIF reads only the first) with an entry per
  source image (SOP class and instance; for a volume the frames the report points at, none
  named when it points at the whole volume), described from its header (TID 1602/1603):
  modality, target region, laterality, rows and columns, frame of reference, view (and its
  modifiers), patient orientation, pixel spacing (the one the areas were measured with),
  and for a volume its slice thickness and spacing. The SEGs are evidence, not entries: the
  library describes the images the findings are on.
- Every group has its TID 4108 tracking identifier (e.g. "cxr-segmenter image 2
  pneumothorax", unique in the report) and UID (derived from the report and the source,
  so the same on a rebuild), and the group's TID 4019 names the engine, its version and
  model hash (`sha256=`).
- Every number carries the concept modifier DCM 121071 "Finding" = the label it is of (TID
  300 lets a measurement's name be post-coordinated), so it reads "Probability 0.03,
  Finding: Abnormal", never a bare probability beside another finding.
- Every decision is its own qualitative evaluation carrying the TID 4019 it was taken with:
  `operating_point=<name>` and `threshold=<value>` after the model hash. The probability
  does not depend on the threshold, so the threshold sits on the decision, not the group.
  A NUM "Threshold" would need an ad-hoc concept, and "CAD Operating Point" (DCM 111071) is
  an index into the CAD templates' operating-point table, not a probability cut-off.
- classifier (`classification_report`): one TID 1501 group per source image: finding
  (DCM 121071) = the label (e.g. SCT 263654008 "Abnormal") whatever the decision; DCM
  122157 "Probability" (UCUM "1") of it; the rule-out decision as DCM 121402 "Normality"
  (CID 222): SCT 17621005 "Normal" when ruled out, SCT 371934000 "Normality Undetermined"
  when not (a rule-out threshold decides only whether a film may be called normal:
  "Abnormal" would claim more); the source image (DCM 121112 "Source of Measurement").
- segmenter (`segmentation_report`): per source image and label one TID 1410 planar ROI
  group (TID 1411 volumetric for a multi-frame source) whose ROI is the label's SEG segment
  (Referenced Segmentation Frame / Referenced Segment): finding = the label (e.g. SCT
  36118008 "Pneumothorax"); the decision "<label>" = SCT "Present" or "Absent" at
  `operating_point=present`; the segment's Probability with Derivation SCT 56851009
  "Maximum" (its highest pixel probability), its area (SCT 42798000 "Area", UCUM mm2, from
  the image's pixel spacing) and for a pneumothorax its percent of the hemithorax (UCUM %).
  The lung fields get their areas too.
- DBT detector (`detection_report`): one TID 1410 group per finding whose ROI is a closed
  POLYLINE rectangle (SCOORD; SR has no rectangle type, TID 1410 takes a closed polyline)
  selected from the frame where it scores highest; its Probability, inferred from every
  frame the finding spans; the decision "<label>" = "Present" at `operating_point=report`.
  A volume without a finding gets a TID 1501 group on the volume whose decision is
  "Absent", and no probability: the answer's is its best reported finding's (0 when none),
  not a probability that the volume holds no mass.

The ruled-out classifier group, as DCMTK's `dsrdump` prints it (the hash shortened by it):

    <contains CONTAINER:(,,"Measurement Group")=CONTINUOUS>
      <has obs context TEXT:(,,"Tracking Identifier")="cxr-ruleout image 1">
      <has obs context UIDREF:(,,"Tracking Unique Identifier")="1.2.826.0.1.3680043...">
      <contains CODE:(,,"Finding")=(263654008,SCT,"Abnormal")>
      <has concept mod TEXT:(,,"Algorithm Name")="cxr-ruleout">
      <has concept mod TEXT:(,,"Algorithm Version")="0.1.0">
      <has concept mod TEXT:(,,"Algorithm Parameters")="sha256=0123456789abcdef0123...">
      <contains NUM:(,,"Probability")="0.03" (1,UCUM,"no units")>
        <has concept mod CODE:(,,"Finding")=(263654008,SCT,"Abnormal")>
      <contains CODE:(,,"Normality")=(17621005,SCT,"Normal")>
        <has concept mod TEXT:(,,"Algorithm Name")="cxr-ruleout">
        <has concept mod TEXT:(,,"Algorithm Version")="0.1.0">
        <has concept mod TEXT:(,,"Algorithm Parameters")="sha256=0123456789abcdef0123...">
        <has concept mod TEXT:(,,"Algorithm Parameters")="operating_point=rule_out">
        <has concept mod TEXT:(,,"Algorithm Parameters")="threshold=0.12">
      <contains IMAGE:(,,"Source of Measurement")=(DX image,)>

Read aloud: finding Abnormal; probability 0.03, of Abnormal; normality Normal, decided by
cxr-ruleout 0.1.0 at its rule_out operating point, threshold 0.12; on the DX image.

Percent of the hemithorax has no standard concept (SNOMED CT, LOINC and DCM were searched;
their ratios and percentages are of other things, and a generic "Area" in % would leave the
reader to guess of what): it is CN-PTX-HEMI "Percent of hemithorax" in cadnode's private
coding scheme 99CADNODE, which the report declares in its Coding Scheme Identification
Sequence, defined in `PRIVATE_CODES` (for the conformance statement). dciodvfy warns that it
does not know the designator, as it would for any private scheme.

Modules, as in every builder here (`seg`, `sc` too):

- codes.py: the coded concepts the reports name, and the private coding scheme
- content.py: the answers a report is built from, where it goes (`ReportIdentity`), and
  its measurement groups, with the checks on what they say
- sop.py: the three reports, their Image Library and the SR document around their groups
"""

from cadnode.encode.provenance import MANUFACTURER, Algorithm, CodedLabel
from cadnode.encode.sr.codes import PERCENT_OF_HEMITHORAX, PRIVATE_CODES, PRIVATE_SCHEME
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
    "PRIVATE_CODES",
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
