"""A classifier's answer as a DICOM TID 1500 Measurement Report (Comprehensive 3D SR).

This is a pure builder: datasets and numbers in, a `highdicom.sr.Comprehensive3DSR` out. It
reads no files, touches no database and makes no UIDs of its own beyond ones derived from
its inputs, so the same inputs and the same series/instance UIDs give the same content.
Only the clock differs: highdicom stamps Content Date/Time, Instance Creation Date/Time and
its own Contributing Equipment entry with the current time; pass `content_datetime` (e.g.
when the engine answered) and all of them take that value, and the same inputs give the
same bytes, so rebuilding a report after a crash reproduces the object its UID names.

The layout follows IHE AI Results (AIR): one TID 1500 report per study, with a TID 1501
measurement group per source image holding

- the TID 4108 tracking identifier (human-readable and a UID derived from the SR and image);
- the source image (DCM 121112 "Source of Measurement");
- the finding (DCM 121071 "Finding") = the label, e.g. SCT 263654008 "Abnormal", or
  SCT 17621005 "Normal" when the film was ruled out;
- the probability of the label as TID 300 measurement DCM 122157 "Probability", UCUM "1";
- TID 4019 algorithm identification (name, version and parameters).

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
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM

import cadnode

MANUFACTURER = "cadnode"

# DCM 122157 "Probability", dimensionless (UCUM "1", "no units").
PROBABILITY = codes.DCM.Probability
NO_UNITS = codes.UCUM.NoUnits
# Recorded instead of the label when the film is ruled out: no abnormality detected.
NORMAL = codes.SCT.Normal
# Procedure reported (TID 1500 row 5, BCID 100, extensible). SNOMED CT 399208008 "Plain
# chest X-ray" (FSN "Plain X-ray of chest (procedure)") names a chest radiograph without a
# view count; it is not in pydicom's code dictionary, whose nearest entries are broader
# (SCT 413815006 "Chest imaging", SCT 168537006 "Plain radiography").
PLAIN_CHEST_XRAY = hd.sr.CodedConcept(
    value="399208008", scheme_designator="SCT", meaning="Plain chest X-ray"
)

# Type 2 attributes highdicom reads from the first source by attribute access; a source
# header lacking one gets it empty rather than failing.
_TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class Algorithm:
    """TID 4019 Algorithm Identification."""

    name: str  # e.g. "cxr-ruleout"
    version: str  # e.g. "0.1.0"
    sha256: str  # model file hash, recorded as an algorithm parameter


@dataclass(frozen=True)
class CodedLabel:
    """A coded concept, e.g. 263654008 / SCT / Abnormal."""

    value: str
    scheme: str
    meaning: str

    def concept(self) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(
            value=self.value, scheme_designator=self.scheme, meaning=self.meaning
        )


@dataclass(frozen=True)
class Classification:
    """One source image's answer."""

    source: pydicom.Dataset  # the source image header (pixel data may be absent)
    label: CodedLabel  # what the probability is of
    probability: float  # 0..1
    operating_point: str  # e.g. "rule_out"
    threshold: float
    ruled_out: bool  # probability < threshold: "no abnormality detected"


def classification_report(
    classifications: list[Classification],
    algorithm: Algorithm,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 900,
    instance_number: int = 1,
    content_datetime: dt.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report with one measurement group per classified source image.

    All sources must belong to one study (the SR joins that study). `content_datetime`
    is written as Content Date/Time, Instance Creation Date/Time and highdicom's
    Contribution DateTime; left out, they are the current time.
    Raises ValueError on an empty list, mixed studies or patients, a repeated source,
    an out-of-range probability or threshold, or a `ruled_out` that contradicts them.
    """
    if not classifications:
        raise ValueError("a classification report needs at least one classification")
    for item in classifications:
        _check(item)
    sources = [item.source for item in classifications]
    _check_sources(sources)

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["cadnode-device", algorithm.name]),
            name=f"cadnode {algorithm.name}",
            manufacturer_name=MANUFACTURER,
            model_name=algorithm.name,
        ),
    )
    groups = [
        _group(item, algorithm, index=index, sop_instance_uid=sop_instance_uid)
        for index, item in enumerate(classifications, start=1)
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=None, observer_device_context=observer
        ),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
    )
    content_date = content_datetime.date() if content_datetime is not None else None
    content_time = content_datetime.time() if content_datetime is not None else None
    sr = hd.sr.Comprehensive3DSR(
        evidence=[_header(source) for source in sources],
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"cadnode {algorithm.name}",
        software_versions=cadnode.__version__,
        series_description=f"cadnode {algorithm.name} results",
        # Machine output nobody has signed: complete, but neither final nor verified.
        is_complete=True,
        is_final=False,
        is_verified=False,
        content_date=content_date,
        content_time=content_time,
    )
    if content_datetime is not None:
        _stamp(sr, content_datetime)
    return sr


def _group(
    item: Classification, algorithm: Algorithm, *, index: int, sop_instance_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    source_uid = str(item.source.SOPInstanceUID)
    probability = hd.sr.Measurement(
        name=PROBABILITY,
        value=float(item.probability),
        unit=NO_UNITS,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=algorithm.name,
            version=algorithm.version,
            parameters=[f"sha256={algorithm.sha256}"],
        ),
    )
    decision_algorithm = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[
            f"sha256={algorithm.sha256}",
            f"operating_point={item.operating_point}",
            f"threshold={float(item.threshold)!r}",
        ],
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=["cadnode-tracking", sop_instance_uid, source_uid]),
            identifier=f"{algorithm.name} image {index}",
        ),
        finding_type=NORMAL if item.ruled_out else item.label.concept(),
        algorithm_id=decision_algorithm,
        measurements=[probability],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(item.source.SOPClassUID),
                referenced_sop_instance_uid=source_uid,
            )
        ],
    )


def _stamp(sr: hd.sr.Comprehensive3DSR, when: dt.datetime) -> None:
    """Put `when` where highdicom wrote the clock: the instance creation and its own entry."""
    sr.InstanceCreationDate = DA(when.date())
    sr.InstanceCreationTime = TM(when.time())
    for equipment in sr.get("ContributingEquipmentSequence", []):
        if equipment.get("ManufacturerModelName") == "highdicom":
            equipment.ContributionDateTime = DT(when)


def _check(item: Classification) -> None:
    p, t = float(item.probability), float(item.threshold)
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"probability {item.probability!r} is not within 0..1")
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise ValueError(f"threshold {item.threshold!r} is not within 0..1")
    if item.ruled_out != (p < t):
        raise ValueError(
            f"ruled_out={item.ruled_out} contradicts probability {p!r} "
            f"and threshold {t!r} (ruled out means probability < threshold)"
        )
    if not item.operating_point:
        raise ValueError("operating point name is empty")


def _check_sources(sources: list[pydicom.Dataset]) -> None:
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        missing = [i for i, source in enumerate(sources) if not source.get(keyword)]
        if missing:
            raise ValueError(f"source(s) {missing} lack {keyword}")
    studies = {str(source.StudyInstanceUID) for source in sources}
    if len(studies) > 1:
        raise ValueError(f"sources span {len(studies)} studies; one report covers one study")
    patients = {str(source.get("PatientID", "")) for source in sources}
    if len(patients) > 1:
        raise ValueError(f"sources name {len(patients)} different patient IDs")
    uids = [str(source.SOPInstanceUID) for source in sources]
    if len(set(uids)) != len(uids):
        raise ValueError("a source image is classified more than once")


def _header(source: pydicom.Dataset) -> pydicom.Dataset:
    """The source's attributes without pixel data, missing type 2 ones present but empty."""
    header = pydicom.Dataset()
    for element in source:
        if element.tag.group < 0x7FE0:
            header.add(element)
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in header:
            setattr(header, keyword, None)
    return header
