"""What is PostgreSQL's own (the database-level tests run on it too, through conftest's
`database` fixture, and C-FIND matching in its SQL through tests/test_matching_sql.py's): the
schema its migrations make, the tallies' PL/pgSQL triggers, times that keep their zone, and a
whole `cadnode serve` on it, from storescu to storescp."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import pytest
import sqlmodel
from pydicom import dcmread
from sqlalchemy import text
from sqlmodel import col

from cadnode.core import connection, migrations
from cadnode.core.db import Alert, AlertKind, Database, utcnow
from cadnode.core.migrations.compare import differences, summary
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.ingest import storescp
from tests.peers import run_cadnode, storescu, wait_for
from tests.test_metrics_tallies import (
    assert_agree,
    context_for,
    counted_whole,
    scraped,
    seed,
    tallied,
)

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")


def test_the_revisions_make_on_postgresql_what_they_make_on_sqlite(
    postgres_url: str, tmp_path: Path
) -> None:
    """Every revision runs on PostgreSQL, and leaves it as far from the models as SQLite (none
    apart: see test_migrations.py's test_the_revisions_make_the_models_tables)."""
    migrations.upgrade(postgres_url, new_from_models=False)
    migrations.upgrade(tmp_path / "cadnode.db", new_from_models=False)
    found = {}
    for where in (postgres_url, tmp_path / "cadnode.db"):
        engine = connection.engine(connection.of(where), pooled=False)
        with engine.connect() as connected:
            found[str(where)] = sorted(summary(differences(connected)))
        engine.dispose()
    assert found[postgres_url] == found[str(tmp_path / "cadnode.db")]
    assert migrations.current(postgres_url).up_to_date


def test_a_new_database_is_the_models_schema_at_head(postgres_url: str) -> None:
    database = Database(postgres_url)
    with database.engine.connect() as connected:
        assert summary(differences(connected)) == []
        # Stored enums are text, as on SQLite: no type to ALTER when a member is added.
        enums = "SELECT count(*) FROM pg_type WHERE typtype = 'e'"
        assert connected.execute(text(enums)).scalar() == 0
    assert migrations.current(postgres_url).up_to_date
    database.engine.dispose()


def test_aware_times_come_back_the_same_and_compare_with_now(postgres_url: str) -> None:
    database = Database(postgres_url)
    since = dt.datetime(2026, 3, 29, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with database.session() as session:
        session.add(Alert(kind=AlertKind.disk_filling, subject="data dir", since=since))
        session.commit()
    with database.session() as session:
        [alert] = session.exec(sqlmodel.select(Alert)).all()
        assert alert.since == since and alert.since.utcoffset() == dt.timedelta(0)
        older = session.exec(sqlmodel.select(Alert).where(col(Alert.since) < utcnow())).all()
        assert len(older) == 1
    database.engine.dispose()


def test_the_tallies_triggers_count_what_counting_every_row_gives(
    postgres_url: str, tmp_path: Path
) -> None:
    """tests/test_metrics_tallies.py's check, on PostgreSQL's PL/pgSQL triggers."""
    database = Database(postgres_url)
    seed(database, 40, rng=random.Random(17))
    assert_agree(scraped(context_for(database, tmp_path)), counted_whole(database))
    database.engine.dispose()


def test_a_recount_gives_what_the_triggers_kept(postgres_url: str) -> None:
    database = Database(postgres_url)
    seed(database, 40, rng=random.Random(23), delete_one=False)
    kept = tallied(database)
    with database.engine.begin() as connected:  # as a revision dropping a table would
        connected.exec_driver_sql("DROP FUNCTION cadnode_job_moved() CASCADE")
    Database(postgres_url).engine.dispose()  # opening it again puts them back, and recounts
    recounted = tallied(database)
    assert recounted.keys() == kept.keys()
    for key, value in kept.items():
        assert recounted[key] == pytest.approx(value, abs=0.002 * max(1.0, abs(value))), key
    database.engine.dispose()




def test_a_film_is_received_routed_and_its_results_delivered_on_postgresql(
    postgres_url: str, tmp_path: Path
) -> None:
    """`cadnode serve` with CADNODE_DATABASE_URL: storescu's film in, its results out to
    storescp, and the rows of it all in PostgreSQL (none in an SQLite file)."""
    film = write_chest_radiograph(tmp_path / "chest.dcm", seed=101, pneumothorax=True)
    received = tmp_path / "pacs"
    with (
        storescp(received) as pacs_port,
        run_cadnode(
            tmp_path / "node",
            f"STORESCP@127.0.0.1:{pacs_port}",
            CADNODE_DATABASE_URL=postgres_url,
        ) as node,
    ):
        done = storescu(node.dicom_port, tmp_path / "chest.dcm", options=("-R",))
        assert done.returncode == 0, done.stderr

        def delivered() -> dict[str, object] | None:
            rows = [r for r in node.studies() if r["study_uid"] == film.StudyInstanceUID]
            return rows[-1] if rows and rows[-1]["state"] in ("delivered", "failed") else None

        row = wait_for(delivered, 120, "the study delivered", interval_s=0.3)
        assert row["state"] == "delivered", row
    kinds = sorted(dcmread(path).Modality for path in received.iterdir())
    assert kinds == ["SEG", "SR", "SR", "SR"]  # rule-out SR, segmenter's SEG and SR, findings SR
    assert not (tmp_path / "node" / "var" / "cadnode.db").exists()
    engine = connection.engine(connection.of(postgres_url), pooled=False)
    with engine.connect() as connected:
        assert connected.execute(text("SELECT count(*) FROM instance")).scalar() == 1
        sent = "SELECT count(*) FROM delivery WHERE state = 'sent'"
        assert connected.execute(text(sent)).scalar() == 4
    engine.dispose()
