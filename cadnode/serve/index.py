"""The query index: what a C-FIND may match, for every object cadnode holds.

Filled lazily by serve, not by receive: before each query or retrieval, the held objects
without a `QueryRecord` (received images in `Instance`, cadnode's own SR/SEG in
`ResultObject`) have their headers read (pixels and anything after them are never read) and
indexed; records whose object is gone are dropped. Why lazily:

- receive stays as fast as it is (it is benchmarked against storescp): no second row, no
  extra attributes to pull out of every C-STORE on the hot path;
- one path for both kinds of object (encode need not know serve exists), and for files
  adopted by the spool's reconciliation;
- the records are derived data: a lost or stale table is rebuilt from the files.

The cost is paid once per object, by the first request after it arrived: 3-4 ms per header
of a 512x512 CT slice on the shared 2-core machine (so about a second for a 300-slice study).
Each record keeps the identifiers a query narrows on as columns and the rest of the query
attributes as DICOM JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydicom import Dataset, dcmread
from sqlalchemy import delete, exists
from sqlalchemy import select as select_columns
from sqlmodel import col, select

from cadnode.core.db import Database, HeldAs, Instance, QueryRecord, ResultObject
from cadnode.core.locks import named_lock

log = structlog.get_logger("cadnode.serve")

INSTANCE, RESULT = HeldAs.instance, HeldAs.result

# The attributes each level's entities have (PS3.4 C.6.1.1 and C.6.2.1, with the optional
# keys viewers ask for). Study Root puts the patient's attributes at the study level.
PATIENT_KEYS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "EthnicGroup",
    "PatientComments",
)
STUDY_KEYS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyInstanceUID",
    "ReferringPhysicianName",
    "StudyDescription",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)
SERIES_KEYS = (
    "Modality",
    "SeriesNumber",
    "SeriesInstanceUID",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "Laterality",
    "ProtocolName",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "StationName",
    "Manufacturer",
    "ManufacturerModelName",
    "OperatorsName",
    "PerformingPhysicianName",
)
IMAGE_KEYS = (
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "ContentDate",
    "ContentTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "ImageType",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "PhotometricInterpretation",
    "ViewPosition",
    "ImageLaterality",
    "ContentLabel",
    "ContentDescription",
    "CompletionFlag",
    "VerificationFlag",
    "ConceptNameCodeSequence",  # an SR's document title
)
HEADER_KEYS = ("SpecificCharacterSet", *PATIENT_KEYS, *STUDY_KEYS, *SERIES_KEYS, *IMAGE_KEYS)


@dataclass(frozen=True)
class Held:
    """One held object, as the index lists it (without its attributes)."""

    sop_instance_uid: str
    held_as: HeldAs
    path: str
    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    sop_class_uid: str
    transfer_syntax: str


@dataclass(frozen=True)
class Narrowing:
    """Identifier values a query or retrieval names outright: the index filters on them."""

    patient_id: str | None = None
    study_uids: Sequence[str] = ()
    series_uids: Sequence[str] = ()
    sop_instance_uids: Sequence[str] = ()


class QueryIndex:
    def __init__(self, database: Database, spool: Path, results: Path) -> None:
        self.database = database
        self.folders: dict[HeldAs, Path] = {INSTANCE: spool, RESULT: results}
        # One refresh at a time, in any receiver process; queries wait for it.
        self._lock = named_lock(database, "query-index")
        self._unreadable: set[str] = set()  # logged once, not on every query

    def file(self, held: Held) -> Path:
        return self.folders[held.held_as] / held.path

    def refresh(self) -> int:
        """Index the held objects not indexed yet, drop records of objects gone; new count."""
        with self._lock, self.database.session() as session:
            received = session.exec(
                select(Instance.sop_instance_uid, Instance.path).where(
                    col(Instance.missing_since).is_(None),
                    ~exists().where(
                        col(QueryRecord.sop_instance_uid) == col(Instance.sop_instance_uid)
                    ),
                )
            ).all()
            made = session.exec(
                select(ResultObject.sop_instance_uid, ResultObject.path).where(
                    ~exists().where(
                        col(QueryRecord.sop_instance_uid) == col(ResultObject.sop_instance_uid)
                    )
                )
            ).all()
            added = 0
            for held_as, rows in ((INSTANCE, received), (RESULT, made)):
                for uid, path in rows:
                    record = self._record(held_as, uid, path)
                    if record is not None:
                        session.add(record)  # the lock and the query above: not indexed yet
                        added += 1
            session.execute(_gone(INSTANCE, Instance))
            session.execute(_gone(RESULT, ResultObject))
            session.commit()
        if added:
            log.info("query.indexed", objects=added)
        return added

    def held(self, narrowing: Narrowing) -> list[Held]:
        statement = select_columns(*_LISTED)
        for column, values in (
            (QueryRecord.study_uid, narrowing.study_uids),
            (QueryRecord.series_uid, narrowing.series_uids),
            (QueryRecord.sop_instance_uid, narrowing.sop_instance_uids),
        ):
            if values:
                statement = statement.where(col(column).in_(values))
        if narrowing.patient_id is not None:
            statement = statement.where(col(QueryRecord.patient_id) == narrowing.patient_id)
        statement = statement.order_by(
            col(QueryRecord.study_uid), col(QueryRecord.series_uid), col(QueryRecord.held_as)
        )
        with self.database.session() as session:
            return [Held(*row) for row in session.execute(statement).all()]

    def attributes(self, uids: Iterable[str]) -> dict[str, Dataset]:
        """The indexed attributes of these objects, by SOP Instance UID."""
        wanted = list(uids)
        found: dict[str, Dataset] = {}
        with self.database.session() as session:
            for start in range(0, len(wanted), 500):  # SQLite's limit on bound parameters
                batch = wanted[start : start + 500]
                statement = select(QueryRecord.sop_instance_uid, QueryRecord.attributes).where(
                    col(QueryRecord.sop_instance_uid).in_(batch)
                )
                for uid, attributes in session.exec(statement).all():
                    found[uid] = Dataset.from_json(dict(attributes))
        return found

    def _record(self, held_as: HeldAs, uid: str, path: str) -> QueryRecord | None:
        file = self.folders[held_as] / path
        try:
            header = dcmread(file, stop_before_pixels=True)
            transfer_syntax = str(header.file_meta.TransferSyntaxUID)
            attributes = _json(header)
        except Exception as error:  # a file gone or damaged: not served, and said so once
            if uid not in self._unreadable:
                self._unreadable.add(uid)
                log.warning("query.unreadable", held_as=held_as.value, path=path, reason=str(error))
            return None
        return QueryRecord(
            sop_instance_uid=uid,
            held_as=held_as,
            path=path,
            patient_id=str(header.get("PatientID", "")),
            study_uid=str(header.get("StudyInstanceUID", "")),
            series_uid=str(header.get("SeriesInstanceUID", "")),
            modality=str(header.get("Modality", "")),
            sop_class_uid=str(header.get("SOPClassUID", "")),
            transfer_syntax=transfer_syntax,
            attributes=attributes,
        )


_LISTED = [
    col(column)
    for column in (
        QueryRecord.sop_instance_uid,
        QueryRecord.held_as,
        QueryRecord.path,
        QueryRecord.patient_id,
        QueryRecord.study_uid,
        QueryRecord.series_uid,
        QueryRecord.modality,
        QueryRecord.sop_class_uid,
        QueryRecord.transfer_syntax,
    )
]


def _json(header: Dataset) -> dict[str, Any]:
    kept = Dataset()
    for keyword in HEADER_KEYS:
        if keyword in header:
            kept[keyword] = header[keyword]
    return kept.to_json_dict()


def _gone(held_as: HeldAs, model: Any) -> Any:
    """Records of one kind whose object the index no longer holds (or whose file is missing)."""
    still_held = exists().where(model.sop_instance_uid == QueryRecord.sop_instance_uid)
    if model is Instance:
        still_held = still_held.where(col(Instance.missing_since).is_(None))
    return delete(QueryRecord).where(col(QueryRecord.held_as) == held_as, ~still_held)
