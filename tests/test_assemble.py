from __future__ import annotations

import datetime as dt
from typing import Any

from pydicom import Dataset
from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation

from cadnode.core.config import AssembleSettings
from cadnode.core.db import Database, Job, JobState, utcnow
from cadnode.ingest.assemble import Assembler
from tests.rows import instance_row, job_of, new_job


def add_job(
    database: Database, sop_classes: list[str], quiet_for_s: float, **job_fields: Any
) -> int:
    study_uid = f"1.2.{len(sop_classes)}.{int(quiet_for_s)}"
    with database.session() as session:
        last = utcnow() - dt.timedelta(seconds=quiet_for_s)
        job = new_job(
            session,
            study_uid,
            instance_count=len(sop_classes),
            last_instance_at=last,
            **job_fields,
        )
        for i, sop_class in enumerate(sop_classes):
            image = Dataset()
            image.SOPInstanceUID = f"{study_uid}.{i}"
            image.SOPClassUID = sop_class
            image.SeriesInstanceUID = "1.2"
            session.add(instance_row(image, "x", job))
        session.commit()
        assert job.id is not None
        return job.id


def state(database: Database, job_id: int) -> JobState:
    return job_of(database, job_id).state


def test_a_single_radiograph_is_released_on_arrival(database: Database) -> None:
    job = add_job(database, [DigitalXRayImageStorageForPresentation], quiet_for_s=0)
    assert Assembler(database, AssembleSettings(quiet_period_s=60)).advance() is None
    assert state(database, job) is JobState.complete


def test_a_multi_image_study_waits_for_the_quiet_period(database: Database) -> None:
    job = add_job(database, [CTImageStorage] * 3, quiet_for_s=1)
    due_in = Assembler(database, AssembleSettings(quiet_period_s=5)).advance()
    assert state(database, job) is JobState.received
    assert due_in is not None and 3.5 < due_in <= 4.0


def test_a_quiet_study_is_released(database: Database) -> None:
    job = add_job(database, [CTImageStorage] * 3, quiet_for_s=6)
    assert Assembler(database, AssembleSettings(quiet_period_s=5)).advance() is None
    assert state(database, job) is JobState.complete


def test_two_radiographs_in_one_study_wait_like_any_series(database: Database) -> None:
    job = add_job(database, [DigitalXRayImageStorageForPresentation] * 2, quiet_for_s=0)
    assert Assembler(database, AssembleSettings(quiet_period_s=2)).advance() is not None
    assert state(database, job) is JobState.received


def test_a_rule_s_own_quiet_period_replaces_the_default(database: Database) -> None:
    # Route recorded the rule's quiet period on the job; assemble reads it from there.
    decided = {"quiet_period_s": 0.5, "quiet_period_decided_at": utcnow()}
    short = add_job(database, [CTImageStorage] * 3, quiet_for_s=1, **decided)
    assembler = Assembler(database, AssembleSettings(quiet_period_s=60), rule_quiet_periods=True)
    assert assembler.advance() is None
    assert state(database, short) is JobState.complete


def test_a_rule_s_longer_quiet_period_holds_the_study(database: Database) -> None:
    decided = {"quiet_period_s": 30.0, "quiet_period_decided_at": utcnow()}
    job = add_job(database, [CTImageStorage] * 3, quiet_for_s=5, **decided)
    due_in = Assembler(database, AssembleSettings(quiet_period_s=2)).advance()
    assert state(database, job) is JobState.received
    assert due_in is not None and 24 < due_in <= 25


def test_without_a_rule_quiet_period_the_default_applies(database: Database) -> None:
    decided = {"quiet_period_s": None, "quiet_period_decided_at": utcnow()}
    job = add_job(database, [CTImageStorage] * 3, quiet_for_s=1, **decided)
    assembler = Assembler(database, AssembleSettings(quiet_period_s=60), rule_quiet_periods=True)
    due_in = assembler.advance()
    assert state(database, job) is JobState.received
    assert due_in is not None and 58 < due_in <= 59


def test_a_study_waits_for_route_to_decide_its_quiet_period(database: Database) -> None:
    """Where rules may set quiet periods, the default running out does not release a study
    whose quiet period route has not recorded yet (its rule may ask for longer)."""
    job = add_job(database, [CTImageStorage] * 3, quiet_for_s=10)
    assembler = Assembler(database, AssembleSettings(quiet_period_s=5), rule_quiet_periods=True)
    due_in = assembler.advance()
    assert state(database, job) is JobState.received
    assert due_in is not None and 0 < due_in <= 1  # looks again soon (route wakes it anyway)
    with database.session() as session:
        row = session.get(Job, job)
        assert row is not None
        row.quiet_period_decided_at = utcnow()  # route: no rule sets one, so the default
        session.add(row)
        session.commit()
    assert assembler.advance() is None
    assert state(database, job) is JobState.complete


def test_a_single_radiograph_does_not_wait_for_route(database: Database) -> None:
    job = add_job(database, [DigitalXRayImageStorageForPresentation], quiet_for_s=0)
    assembler = Assembler(database, AssembleSettings(quiet_period_s=5), rule_quiet_periods=True)
    assert assembler.advance() is None
    assert state(database, job) is JobState.complete
