"""What every object cadnode derives shares: who made it, from what, and when.

The SR, SEG and Secondary Capture builders take their algorithm identification, their
source checks and headers, and their clock from here, so the three say the same thing the
same way. highdicom stamps the current time into several attributes; `stamp` replaces all
of them with one given moment, so the same inputs give the same bytes and rebuilding an
object after a crash reproduces the one its UID names.
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass
from typing import Protocol

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, DT, TM

from cadnode.encode.charset import utf8_header

MANUFACTURER = "cadnode"
# CID 7162 Algorithm Families: every cadnode engine is a trained model.
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence
# Said wherever a reader may mistake a derived object for an acquisition.
NOT_FOR_DIAGNOSIS = "AI result, not for primary diagnosis"

# highdicom warns of a one-component person name (valid DICOM: a name written whole, e.g. in
# Greek or Korean) by quoting it, and warnings reach the log, where no patient name may go.
warnings.filterwarnings(
    "ignore",
    message="The string .* is unlikely to represent the intended person name",
    category=UserWarning,
    module="highdicom",
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


class HasCode(Protocol):
    """A coded concept's three parts (the manifest's `Code`, or `CodedLabel`)."""

    @property
    def value(self) -> str: ...
    @property
    def scheme(self) -> str: ...
    @property
    def meaning(self) -> str: ...


def concept(code: HasCode) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


@dataclass(frozen=True)
class CodedLabel:
    """A coded concept, e.g. 263654008 / SCT / Abnormal."""

    value: str
    scheme: str
    meaning: str

    def concept(self) -> hd.sr.CodedConcept:
        return concept(self)


@dataclass(frozen=True)
class Algorithm:
    """The engine that answered: TID 4019 in SRs, Algorithm Identification in SEGs."""

    name: str  # e.g. "cxr-ruleout"
    version: str  # e.g. "0.1.0"
    sha256: str  # model file hash, recorded as an algorithm parameter

    @property
    def model_name(self) -> str:
        """Manufacturer's Model Name of the objects it makes."""
        return f"cadnode {self.name}"

    def series_description(self, kind: str) -> str:
        """e.g. "cadnode cxr-segmenter SEG, not for primary diagnosis" (LO: 64 characters,
        the warning kept whole and the engine's name shortened if need be)."""
        suffix = f" {kind}, not for primary diagnosis"
        return f"cadnode {self.name}"[: 64 - len(suffix)] + suffix

    def for_sr(self, **parameters: str) -> hd.sr.AlgorithmIdentification:
        """TID 4019, parameters written `key=value` after the model hash."""
        return hd.sr.AlgorithmIdentification(
            name=self.name,
            version=self.version,
            parameters=[f"{key}={value}" for key, value in self._parameters(parameters).items()],
        )

    def for_seg(self, **parameters: str) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            family=ALGORITHM_FAMILY,
            version=self.version,
            source=MANUFACTURER,
            parameters=self._parameters(parameters),
        )

    def _parameters(self, extra: dict[str, str]) -> dict[str, str]:
        return {"sha256": self.sha256, **extra}


def check_sources(sources: list[pydicom.Dataset]) -> None:
    """One study, one patient, each image once, each with its identifying UIDs."""
    if not sources:
        raise ValueError("a derived object needs at least one source image")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        missing = [i for i, source in enumerate(sources) if not source.get(keyword)]
        if missing:
            raise ValueError(f"source(s) {missing} lack {keyword}")
    studies = {str(source.StudyInstanceUID) for source in sources}
    if len(studies) > 1:
        raise ValueError(f"sources span {len(studies)} studies; one object covers one study")
    patients = {str(source.get("PatientID", "")) for source in sources}
    if len(patients) > 1:
        raise ValueError(f"sources name {len(patients)} different patient IDs")
    uids = [str(source.SOPInstanceUID) for source in sources]
    if len(set(uids)) != len(uids):
        raise ValueError("a source image is given more than once")


def source_header(source: pydicom.Dataset) -> pydicom.Dataset:
    """What a derived object copies from its source: the source's attributes without pixel
    data, text decoded and declared UTF-8 whatever the source's character set
    (`cadnode.encode.charset`), missing type 2 ones present but empty."""
    header = utf8_header(source)
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def split(when: dt.datetime | None) -> tuple[dt.date | None, dt.time | None]:
    """(date, time) for highdicom's content_date/content_time; (None, None) means now."""
    return (when.date(), when.time()) if when is not None else (None, None)


def finish(ds: pydicom.Dataset, algorithm: Algorithm, when: dt.datetime | None) -> None:
    """What every derived object gets last: one moment (`when`, or now) wherever highdicom
    wrote the clock and as the Series Date/Time, and the engine named as contributing
    equipment (its name and version), as IHE AI Results asks of every result."""
    moment = when if when is not None else dt.datetime.now(dt.UTC).replace(tzinfo=None)
    stamp(ds, moment)
    ds.SeriesDate = DA(moment.date())
    ds.SeriesTime = TM(moment.time())
    credit(ds, algorithm, moment)


def credit(ds: pydicom.Dataset, algorithm: Algorithm, when: dt.datetime) -> None:
    """Add the engine to the Contributing Equipment Sequence (DCM 109102 "Processing
    Equipment", CID 7005), once: Manufacturer's Model Name is the engine, Software Versions
    its version and Device Serial Number its model hash (shortened to the 64-character LO)."""
    entries = list(ds.get("ContributingEquipmentSequence", []))
    if any(entry.get("ManufacturerModelName") == algorithm.name for entry in entries):
        return
    entry = pydicom.Dataset()
    purpose = pydicom.Dataset()
    purpose.CodeValue = codes.DCM.ProcessingEquipment.value
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = codes.DCM.ProcessingEquipment.meaning
    entry.PurposeOfReferenceCodeSequence = [purpose]
    entry.Manufacturer = MANUFACTURER
    entry.ManufacturerModelName = algorithm.name
    entry.SoftwareVersions = algorithm.version
    entry.DeviceSerialNumber = algorithm.sha256[:64]
    entry.ContributionDateTime = DT(when)
    entry.ContributionDescription = f"{algorithm.name} {algorithm.version}: {NOT_FOR_DIAGNOSIS}"[
        :64
    ]
    ds.ContributingEquipmentSequence = [*entries, entry]


def stamp(ds: pydicom.Dataset, when: dt.datetime) -> None:
    """Put `when` wherever highdicom wrote the clock."""
    ds.InstanceCreationDate = DA(when.date())
    ds.InstanceCreationTime = TM(when.time())
    if "ContentDate" in ds:
        ds.ContentDate = DA(when.date())
        ds.ContentTime = TM(when.time())
    if "DateOfSecondaryCapture" in ds:
        ds.DateOfSecondaryCapture = DA(when.date())
        ds.TimeOfSecondaryCapture = TM(when.time())
    for equipment in ds.get("ContributingEquipmentSequence", []):
        if equipment.get("ManufacturerModelName") == "highdicom":
            equipment.ContributionDateTime = DT(when)
