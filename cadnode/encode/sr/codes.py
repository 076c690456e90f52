"""The SR's coded values: the concepts its reports name, and cadnode's private coding scheme."""

from __future__ import annotations

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes

# DCM 122157 "Probability", dimensionless (UCUM "1", "no units").
PROBABILITY = codes.DCM.Probability
NO_UNITS = codes.UCUM.NoUnits
# Recorded instead of the label when the film is ruled out: no abnormality detected.
NORMAL = codes.SCT.Normal
PRESENT, ABSENT = codes.SCT.Present, codes.SCT.Absent
AREA, SQUARE_MM, PERCENT = codes.SCT.Area, codes.UCUM.SquareMillimeter, codes.UCUM.Percent
# Procedure reported (TID 1500 row 5, BCID 100, extensible). SNOMED CT 399208008 "Plain
# chest X-ray" (FSN "Plain X-ray of chest (procedure)") names a chest radiograph without a
# view count; it is not in pydicom's code dictionary, whose nearest entries are broader
# (SCT 413815006 "Chest imaging", SCT 168537006 "Plain radiography").
PLAIN_CHEST_XRAY = hd.sr.CodedConcept(
    value="399208008", scheme_designator="SCT", meaning="Plain chest X-ray"
)
# Tomosynthesis is a mammographic procedure: SCT 71651007 "Mammography".
MAMMOGRAPHY = codes.SCT.Mammography

PRIVATE_SCHEME = "99CADNODE"
PERCENT_OF_HEMITHORAX = hd.sr.CodedConcept(
    value="CN-PTX-HEMI", scheme_designator=PRIVATE_SCHEME, meaning="Percent of hemithorax"
)
# What a report that uses PRIVATE_SCHEME declares in its Coding Scheme Identification Sequence.
PRIVATE_SCHEMES = [
    CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="cadnode local codes",
        responsible_organization="cadnode",
    )
]
