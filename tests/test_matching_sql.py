"""C-FIND matching in SQL (cadnode.dicom.matching_sql) against the matcher (cadnode.dicom.
matching), on one table of cases: each key's value is matched by the matcher against a held
value, and by SQL against the query index's column made from that value; both must give the
case's answer (names in any case, everything else case-sensitive, as docs/conformance.md says)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from pydicom import Dataset
from sqlalchemy import Engine, create_engine, delete, func, insert, select
from sqlmodel import SQLModel

from cadnode.core import connection
from cadnode.core.db import QueryStudy
from cadnode.dicom.indexing import STUDY_COLUMNS, study_row
from cadnode.dicom.matching import matches, wanted
from cadnode.dicom.matching_sql import condition
from tests.postgres import fresh_database

# A wildcard in a UID is a case below: pydicom warns that it is no UID.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")

YAMADA = "Yamada^Tarou=山田^太郎=やまだ^たろう"

# (keyword, the key's value, the held value ("": none), whether they match)
CASES = [
    # Person names: in any case, wildcards too.
    ("PatientName", "DOE^JOHN", "Doe^John", True),
    ("PatientName", "doe^john", "Doe^John", True),
    ("PatientName", "doe*", "Doe^John", True),
    ("PatientName", "D?E^*", "Doe^John", True),
    ("PatientName", "*JOHN", "Doe^John", True),
    ("PatientName", "Doe", "Doe^John", False),
    ("PatientName", "D?^*", "Doe^John", False),
    ("PatientName", "müller*", "MÜLLER^Hans", True),
    ("PatientName", "Yamada*", YAMADA, True),
    ("PatientName", "*山田*", YAMADA, True),
    ("PatientName", "Doe^John", "", False),
    ("PatientName", "**", "", False),
    # Other text: case-sensitive; * and ? the only wildcards, [ and % and _ themselves.
    ("PatientID", "PID-1", "PID-1", True),
    ("PatientID", "pid-1", "PID-1", False),
    ("PatientID", "PID-?", "PID-1", True),
    ("PatientID", "PID-?", "PID-12", False),
    ("PatientID", "PID*", "PID", True),
    ("PatientID", "PID-1 ", "PID-1", True),
    ("PatientID", "[AB]*", "[AB]-7", True),
    ("PatientID", "[AB]*", "A-7", False),
    ("PatientID", "[!A]*", "B-7", False),
    ("PatientID", "100%_*", "100%_x", True),
    ("PatientID", "100%_*", "1000x", False),
    ("PatientID", "PID-1", "", False),
    ("StudyDescription", "*chest*", "CT chest with contrast", True),
    ("StudyDescription", "*Chest*", "CT chest with contrast", False),
    ("StudyDescription", "CT?chest*", "CT chest", True),
    ("AccessionNumber", "ACC*", "ACC123", True),
    ("AccessionNumber", "acc*", "ACC123", False),
    ("PatientSex", "F", "F", True),
    ("PatientSex", "f", "F", False),
    ("PatientSex", "?", "M", True),
    # Dates and times: single values, wildcards, ranges with either end open.
    ("StudyDate", "20250115", "20250115", True),
    ("StudyDate", "2025*", "20250115", True),
    ("StudyDate", "20250101-20250131", "20250115", True),
    ("StudyDate", "20250101-20250131", "20250131", True),
    ("StudyDate", "20250101-20250131", "20250201", False),
    ("StudyDate", "-20250101", "20241231", True),
    ("StudyDate", "20250101-", "20241231", False),
    ("StudyDate", "20250101-", "20260101", True),
    ("StudyDate", "20250101-20250131", "", False),
    ("PatientBirthDate", "19500101-19591231", "19550607", True),
    ("StudyTime", "080000-120000", "093000.123", True),
    ("StudyTime", "080000-0900", "090059", True),
    ("StudyTime", "080000-0900", "090100", False),
    ("StudyTime", "-0800", "081500", False),
    # UIDs: one, or a list; never wildcards.
    ("StudyInstanceUID", "1.2.3", "1.2.3", True),
    ("StudyInstanceUID", "1.2.3", "1.2.34", False),
    ("StudyInstanceUID", "1.2.3\\1.2.4", "1.2.4", True),
    ("StudyInstanceUID", "1.2.3\\1.2.4", "1.2.5", False),
    ("StudyInstanceUID", "1.2.*", "1.2.3", False),
]


# PostgreSQL's variant is integration (a server process): the unit subset stays on SQLite.
@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]
)
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """The query index's table alone, on SQLite in memory or on a PostgreSQL server."""
    with ExitStack() as stack:
        engine = (
            create_engine("sqlite://")
            if request.param == "sqlite"
            else connection.engine(
                connection.of(
                    stack.enter_context(fresh_database(request.getfixturevalue("postgres_server")))
                )
            )
        )
        SQLModel.metadata.create_all(engine, tables=[QueryStudy.__table__])  # type: ignore[attr-defined]
        yield engine
        engine.dispose()


@pytest.mark.parametrize(("keyword", "asked", "held", "expected"), CASES)
def test_sql_and_the_matcher_agree(
    engine: Engine, keyword: str, asked: str, held: str, expected: bool
) -> None:
    candidate = Dataset()
    if held:
        setattr(candidate, keyword, held)
    query = Dataset()
    setattr(query, keyword, asked)
    assert matches(candidate, query) is expected, "the matcher"
    uid = held if keyword == "StudyInstanceUID" else "1.2.999"
    column = getattr(QueryStudy, STUDY_COLUMNS[keyword])
    with engine.begin() as connection:
        connection.execute(delete(QueryStudy))
        connection.execute(insert(QueryStudy), [study_row(uid, candidate.to_json_dict())])
        found = connection.execute(
            select(func.count())
            .select_from(QueryStudy)
            .where(condition(column, [wanted(query[keyword])]))
        ).scalar()
    assert bool(found) is expected, "SQL"


def test_every_column_of_the_study_index_has_cases() -> None:
    assert {keyword for keyword, *_ in CASES} >= set(STUDY_COLUMNS) - {"ReferringPhysicianName"}
