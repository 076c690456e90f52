"""The SR's coded values: the concepts its reports name, and cadnode's private coding scheme.

Every code here but one is standard (DCM, SCT, UCUM, from PS3.16 and pydicom's code
dictionary); the exception, percent of the hemithorax, is defined below with its meaning.
"""

from __future__ import annotations

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# DCM 122157 "Probability", dimensionless (UCUM "1", "no units"). What it is the probability
# of is said by a concept modifier (TID 300 allows post-coordinating the measurement's name)
# DCM 121071 "Finding" = the label, so a reader sees "Probability ... Finding: Abnormal".
PROBABILITY = codes.DCM.Probability
NO_UNITS = codes.UCUM.NoUnits
FINDING = codes.DCM.Finding
# The TID 300 Derivation of the segmenter's probability: the highest pixel probability
# inside the segment (SCT 56851009 "Maximum").
MAXIMUM: Code = codes.SCT.Maximum

# The rule-out decision: DCM 121402 "Normality" (TID 310's name for a normality evaluation)
# valued from CID 222 "Normality". Ruled out is SCT 17621005 "Normal"; not ruled out is
# SCT 371934000 "Normality Undetermined": a rule-out threshold decides only whether a film
# may be called normal, so "Abnormal" would claim more than it decided.
NORMALITY = codes.DCM.Normality
NORMAL: Code = codes.SCT.Normal
NORMALITY_UNDETERMINED: Code = codes.SCT.NormalityUndetermined
PRESENT, ABSENT = codes.SCT.Present, codes.SCT.Absent
AREA, SQUARE_MM, PERCENT = codes.SCT.Area, codes.UCUM.SquareMillimeter, codes.UCUM.Percent
MILLIMETER = codes.UCUM.Millimeter
PIXELS = hd.sr.CodedConcept(value="{pixels}", scheme_designator="UCUM", meaning="Pixels")

# Procedure reported (TID 1500 row 5, BCID 100, extensible). SNOMED CT 399208008 "Plain
# chest X-ray" (FSN "Plain X-ray of chest (procedure)") names a chest radiograph without a
# view count; it is not in pydicom's code dictionary, whose nearest entries are broader
# (SCT 413815006 "Chest imaging", SCT 168537006 "Plain radiography").
PLAIN_CHEST_XRAY = hd.sr.CodedConcept(
    value="399208008", scheme_designator="SCT", meaning="Plain chest X-ray"
)
# Tomosynthesis is a mammographic procedure: SCT 71651007 "Mammography".
MAMMOGRAPHY = codes.SCT.Mammography

# Image Library entry descriptors (TID 1602/1603): CID 29 modality by the source's Modality,
# CID 244 laterality by its Image (or Frame) Laterality; "U" (unpaired) has no code and is
# left out.
MODALITIES: dict[str, Code] = {code.value: code for code in codes.cid29.concepts.values()}
LATERALITIES: dict[str, Code] = {
    "R": codes.SCT.Right,
    "L": codes.SCT.Left,
    "B": codes.cid244.Bilateral,
}

# Percent of the hemithorax has no standard concept. SNOMED CT, LOINC and DCM (PS3.16) were
# searched: their ratios and percentages are of other things (LOINC 59076-0 "Cardiothoracic
# Area Ratio", DCM 111046 "Percent Fibroglandular Tissue", DCM 112018 "Calcification extent
# as percent of surface"), and a generic "Area" in % (or SCT 118586006 "Ratio") with
# modifiers would leave the reader to guess what it is a percentage of.
PRIVATE_SCHEME = "99CADNODE"
PERCENT_OF_HEMITHORAX = hd.sr.CodedConcept(
    value="CN-PTX-HEMI", scheme_designator=PRIVATE_SCHEME, meaning="Percent of hemithorax"
)
PERCENT_OF_HEMITHORAX_DEFINITION = (
    "Area of the pneumothorax as a percentage (UCUM %) of the area of its hemithorax, on "
    "the worse side; a side's hemithorax is the union of its lung field and the "
    "pneumothorax on that side, both as segmented on the image "
    "(cadnode.infer.postprocess.hemithorax_percent)."
)
# Each private code with its definition, for the conformance statement.
PRIVATE_CODES: list[tuple[hd.sr.CodedConcept, str]] = [
    (PERCENT_OF_HEMITHORAX, PERCENT_OF_HEMITHORAX_DEFINITION)
]
# What a report that uses PRIVATE_SCHEME declares in its Coding Scheme Identification Sequence.
PRIVATE_SCHEMES = [
    CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="cadnode local codes",
        responsible_organization="cadnode",
    )
]
