"""The query index, read: what a C-FIND may match and a retrieval may send, in SQL.

The rows are written where objects become held, in the same commit (cadnode/dicom/indexing.py:
a study's instances when its job completes, a result object when it is recorded), never by a
request. A study or patient query reads QueryStudy, one row per study; a series or image query
reads the QueryRecords of the one study it must name. Either way the keys with a column are
matched in SQL (cadnode/dicom/matching_sql.py), page by page in the order of the entities'
unique keys, and serve checks every key on the rows that SQL returned.

An object whose file the spool's reconciliation found gone (`Instance.missing_since`) is
neither listed nor counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset
from sqlalchemy import ColumnElement, func
from sqlalchemy import select as select_columns
from sqlmodel import col, select

from cadnode.core.db import Database, HeldAs, Instance, QueryRecord, QueryStudy
from cadnode.dicom.indexing import INSTANCE, RECORD_COLUMNS, RESULT, STUDY_COLUMNS

__all__ = ["INSTANCE", "RESULT", "Held", "Narrowing", "QueryIndex", "Tally"]

Condition = ColumnElement[bool]
PAGE = 500  # entities per SQL query (also within SQLite's limit on bound parameters)

STUDY_TABLE = {keyword: getattr(QueryStudy, name) for keyword, name in STUDY_COLUMNS.items()}
RECORD_TABLE = {keyword: getattr(QueryRecord, name) for keyword, name in RECORD_COLUMNS.items()}


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


@dataclass
class Tally:
    """What an entity holds, for the counts a response carries."""

    studies: set[str] = field(default_factory=set)
    series: set[str] = field(default_factory=set)
    modalities: set[str] = field(default_factory=set)
    sop_classes: set[str] = field(default_factory=set)
    instances: int = 0
    transfer_syntax: str = ""


class QueryIndex:
    def __init__(self, database: Database, spool: Path, results: Path) -> None:
        self.database = database
        self.folders: dict[HeldAs, Path] = {INSTANCE: spool, RESULT: results}

    def file(self, held: Held) -> Path:
        return self.folders[held.held_as] / held.path

    def held(self, narrowing: Narrowing, conditions: Iterable[Condition] = ()) -> list[Held]:
        """The objects a narrowing names (and that meet the conditions on QueryRecord)."""
        statement = _present(select_columns(*_LISTED)).where(*conditions)
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

    def studies(
        self, conditions: Sequence[Condition], after: str | None
    ) -> list[tuple[str, dict[str, Any]]]:
        """The next page of studies meeting the conditions (after the study `after`, if
        any): UID and attributes, in UID order."""
        if after is not None:
            conditions = [*conditions, col(QueryStudy.study_uid) > after]
        statement = (
            select(QueryStudy.study_uid, QueryStudy.attributes)
            .where(*conditions)
            .order_by(col(QueryStudy.study_uid))
            .limit(PAGE)
        )
        with self.database.session() as session:
            return [(uid, dict(attributes)) for uid, attributes in session.exec(statement)]

    def patients(
        self, conditions: Sequence[Condition], after: str | None
    ) -> list[tuple[str, dict[str, Any]]]:
        """The next page of patients with a study meeting the conditions (after the patient
        `after`, if any): Patient ID and the attributes of the first such study, in Patient
        ID order."""
        if after is not None:
            conditions = [*conditions, col(QueryStudy.patient_id) > after]
        first_study = (
            select_columns(col(QueryStudy.patient_id), func.min(col(QueryStudy.study_uid)))
            .where(*conditions)
            .group_by(col(QueryStudy.patient_id))
            .order_by(col(QueryStudy.patient_id))
            .limit(PAGE)
        )
        with self.database.session() as session:
            firsts = {patient: study for patient, study in session.execute(first_study)}
            attributes = {
                uid: dict(values)
                for uid, values in session.exec(
                    select(QueryStudy.study_uid, QueryStudy.attributes).where(
                        col(QueryStudy.study_uid).in_(firsts.values())
                    )
                )
            }
        return [(patient, attributes[study]) for patient, study in firsts.items()]

    def tallies(self, keyword: str, entities: Sequence[str]) -> dict[str, Tally]:
        """What each of these patients or studies (`keyword`: PatientID, StudyInstanceUID)
        holds: one grouped read of their objects' records."""
        grouping = RECORD_TABLE[keyword]
        statement = (
            _present(
                select_columns(
                    grouping,
                    col(QueryRecord.study_uid),
                    col(QueryRecord.series_uid),
                    col(QueryRecord.modality),
                    col(QueryRecord.sop_class_uid),
                    func.count(),
                )
            )
            .where(grouping.in_(entities))
            .group_by(
                grouping,
                QueryRecord.study_uid,
                QueryRecord.series_uid,
                QueryRecord.modality,
                QueryRecord.sop_class_uid,
            )
        )
        found: dict[str, Tally] = {}
        with self.database.session() as session:
            for entity, study, series, modality, sop_class, count in session.execute(statement):
                tally = found.setdefault(entity, Tally())
                tally.studies.add(study)
                tally.series.add(series)
                tally.sop_classes.add(sop_class)
                tally.instances += count
                if modality:
                    tally.modalities.add(modality)
        return found

    def attributes(self, uids: Iterable[str]) -> dict[str, Dataset]:
        """The indexed attributes of these objects, by SOP Instance UID."""
        wanted = list(uids)
        found: dict[str, Dataset] = {}
        with self.database.session() as session:
            for start in range(0, len(wanted), PAGE):
                batch = wanted[start : start + PAGE]
                statement = select(QueryRecord.sop_instance_uid, QueryRecord.attributes).where(
                    col(QueryRecord.sop_instance_uid).in_(batch)
                )
                for uid, attributes in session.exec(statement).all():
                    found[uid] = Dataset.from_json(dict(attributes))
        return found


def holding(condition_on_record: Condition) -> Condition:
    """A condition on a study: that one of its objects meets a condition on QueryRecord."""
    return (
        select_columns(col(QueryRecord.sop_instance_uid))
        .where(col(QueryRecord.study_uid) == col(QueryStudy.study_uid), condition_on_record)
        .exists()
    )


def _present(statement: Any) -> Any:
    """Without the received objects whose file is gone (a result has no Instance row)."""
    return (
        statement.select_from(QueryRecord)
        .outerjoin(Instance, col(Instance.sop_instance_uid) == col(QueryRecord.sop_instance_uid))
        .where(col(Instance.missing_since).is_(None))
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
