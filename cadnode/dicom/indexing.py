"""The query index's rows: what a C-FIND may match of each object cadnode holds, read from
its header (never its pixels), for serve (cadnode/serve/index.py) to query in SQL.

Written where an object becomes held, in the commit that makes it so:

- a received study's instances when assemble completes its job (`Indexer.index_job`, in the
  commit of the transition, which also sets `Job.indexed_at`);
- a result object when encode records it (`index_result`, in the commit of its
  ResultObject row).

A job released by a cadnode that did not index at completion is indexed by assemble a few at
a time (`Indexer.backfill`), reusing the records that cadnode made. Rows go with the rows of
what they index (triggers, cadnode/core/tallies.py).

Each object's QueryRecord keeps the identifiers a series or image query narrows on as columns
and the query attributes as DICOM JSON; each study's QueryStudy, its patient's and its own
attributes, with the keys a study or patient query narrows on as columns. Columns hold values
as matching compares them (cadnode.dicom.matching.comparable), taken from the DICOM JSON as
the matcher reads it back, so SQL and the matcher see the same value.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog
from pydicom import Dataset, dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag
from sqlalchemy import exists, update
from sqlmodel import Session, col, select

from cadnode.core.connection import insert_new
from cadnode.core.db import (
    Database,
    HeldAs,
    Instance,
    Job,
    JobState,
    QueryRecord,
    QueryStudy,
    ResultObject,
    Study,
    utcnow,
)
from cadnode.dicom.matching import values_of

log = structlog.get_logger("cadnode.dicom.indexing")

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

# The keys each table has a column for: keyword -> column name.
STUDY_COLUMNS = {
    "StudyInstanceUID": "study_uid",
    "PatientID": "patient_id",
    "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "AccessionNumber": "accession_number",
    "ReferringPhysicianName": "referring_physician_name",
    "StudyDescription": "study_description",
}
RECORD_COLUMNS = {
    "SOPInstanceUID": "sop_instance_uid",
    "PatientID": "patient_id",
    "StudyInstanceUID": "study_uid",
    "SeriesInstanceUID": "series_uid",
    "Modality": "modality",
    "SOPClassUID": "sop_class_uid",
}
_HEADER_TAGS = [Tag(keyword) for keyword in HEADER_KEYS]
# A study's row keeps these of its representative object's attributes (DICOM JSON tags).
_STUDY_TAGS = frozenset(
    f"{tag_for_keyword(keyword):08X}"
    for keyword in ("SpecificCharacterSet", *PATIENT_KEYS, *STUDY_KEYS)
)


class Indexer:
    """Indexes the objects of a job (received instances, result objects) from their files."""

    def __init__(self, spool: Path, results: Path) -> None:
        self.folders = {INSTANCE: spool, RESULT: results}

    def index_job(self, session: Session, job_id: int) -> int:
        """Add the job's received instances not indexed yet to the session's transaction (the
        caller commits, with the job's transition); how many were."""
        rows = session.exec(
            select(Instance.sop_instance_uid, Instance.path).where(
                Instance.job_id == job_id,
                col(Instance.missing_since).is_(None),
                _not_indexed(Instance.sop_instance_uid),
            )
        ).all()
        added = self._index(session, INSTANCE, rows)
        study_uid = session.exec(
            select(Study.study_uid).join(Job, col(Job.study_id) == Study.id).where(Job.id == job_id)
        ).one()
        _study_row(session, study_uid)
        return added

    def backfill(self, database: Database, limit: int) -> int:
        """Index up to `limit` released jobs that were released without (by a cadnode before
        this one), with their result objects; how many jobs. Each commits on its own."""
        with database.session() as session:
            jobs = session.exec(
                select(Job.id)
                .where(col(Job.indexed_at).is_(None), Job.state != JobState.received)
                .limit(limit)
            ).all()
            added = 0
            for job_id in jobs:
                assert job_id is not None
                added += self.index_job(session, job_id) + self._index_results(session, job_id)
                indexed = update(Job).where(col(Job.id) == job_id).values(indexed_at=utcnow())
                session.execute(indexed)
                session.commit()
        if jobs:
            log.info("query.backfilled", jobs=len(jobs), objects=added)
        return len(jobs)

    def _index_results(self, session: Session, job_id: int) -> int:
        rows = session.exec(
            select(ResultObject.sop_instance_uid, ResultObject.path).where(
                ResultObject.job_id == job_id, _not_indexed(ResultObject.sop_instance_uid)
            )
        ).all()
        added = self._index(session, RESULT, rows)
        for (study_uid,) in session.execute(
            select(QueryRecord.study_uid)
            .where(col(QueryRecord.sop_instance_uid).in_([uid for uid, _ in rows]))
            .distinct()
        ):
            _study_row(session, study_uid)
        return added

    def _index(self, session: Session, held_as: HeldAs, rows: Iterable[tuple[str, str]]) -> int:
        records = []
        for uid, path in rows:
            header = _header(self.folders[held_as] / path, held_as, path)
            if header is not None:
                records.append(record_row(held_as, uid, path, header))
        if records:
            session.execute(_insert_new(session, QueryRecord), records)
        return len(records)


def index_result(session: Session, uid: str, path: str, data: bytes) -> None:
    """Add a result object just written (its file's bytes) to the session's transaction."""
    header = _header(io.BytesIO(data), RESULT, path)
    if header is None:
        return
    record = record_row(RESULT, uid, path, header)
    session.execute(_insert_new(session, QueryRecord), [record])
    _study_row(session, record["study_uid"])


def record_row(held_as: HeldAs, uid: str, path: str, header: Dataset) -> dict[str, Any]:
    """An object's QueryRecord, as column values (text and UIDs: the same read from the
    header as from its DICOM JSON)."""
    row: dict[str, Any] = {name: _first(header, kw) for kw, name in RECORD_COLUMNS.items()}
    return {
        **row,
        "sop_instance_uid": uid,
        "held_as": held_as,
        "path": path,
        "transfer_syntax": str(header.file_meta.get("TransferSyntaxUID", "")),
        "attributes": _json(header),
    }


def study_row(study_uid: str, attributes: dict[str, Any]) -> dict[str, Any]:
    """A study's QueryStudy, as column values, from its representative object's attributes."""
    kept = {tag: value for tag, value in attributes.items() if tag in _STUDY_TAGS}
    read_back = Dataset.from_json(kept)
    row = {name: _first(read_back, keyword) for keyword, name in STUDY_COLUMNS.items()}
    return {**row, "study_uid": study_uid, "attributes": kept}


def _study_row(session: Session, study_uid: str) -> None:
    """Write the study's row if it has none, from its representative record (a received
    image before a result, as serve answers for an entity)."""
    if session.get(QueryStudy, study_uid) is not None:
        return
    representative = session.exec(
        select(QueryRecord.attributes)
        .where(QueryRecord.study_uid == study_uid)
        .order_by(col(QueryRecord.held_as), col(QueryRecord.sop_instance_uid))
        .limit(1)
    ).first()
    if representative is not None:
        row = study_row(study_uid, dict(representative))
        session.execute(_insert_new(session, QueryStudy), [row])


def _not_indexed(uid_column: Any) -> Any:
    return ~exists().where(col(QueryRecord.sop_instance_uid) == uid_column)


def _header(source: Path | io.BytesIO, held_as: HeldAs, path: str) -> Dataset | None:
    """The object's query attributes and file meta, or None (said why) if it does not read:
    it is then not served, and its job goes on."""
    try:
        return dcmread(source, stop_before_pixels=True, specific_tags=list(HEADER_KEYS))
    except Exception as error:
        log.warning("query.unreadable", held_as=held_as.value, path=path, reason=str(error))
        return None


def _json(header: Dataset) -> dict[str, Any]:
    kept = Dataset()
    for tag in _HEADER_TAGS:
        element = header.get(tag)
        if element is not None:
            kept.add(element)
    return kept.to_json_dict()


def _first(dataset: Dataset, keyword: str) -> str:
    """The attribute's first value as matching compares it ("" where it has none)."""
    values = values_of(dataset.get(Tag(keyword)))
    return values[0] if values else ""


def _insert_new(session: Session, model: Any) -> Any:
    """An insert skipping what is indexed already (another writer got there first)."""
    return insert_new(model, session.get_bind().dialect.name)
