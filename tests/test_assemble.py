from __future__ import annotations

import datetime as dt

from pydicom import Dataset
from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation

from cadnode.core.config import AssembleSettings
from cadnode.core.db import Database, JobState, utcnow
from cadnode.ingest.assemble import Assembler
from tests.rows import instance_row, job_of, new_job


def add_job(database: Database, sop_classes: list[str], quiet_for_s: float) -> int:
    study_uid = f"1.2.{len(sop_classes)}.{int(quiet_for_s)}"
    with database.session() as session:
        last = utcnow() - dt.timedelta(seconds=quiet_for_s)
        job = new_job(session, study_uid, instance_count=len(sop_classes), last_instance_at=last)
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
    short = add_job(database, [CTImageStorage] * 3, quiet_for_s=1)
    asked: dict[int | None, float | None] = {short: 0.5}
    assembler = Assembler(
        database, AssembleSettings(quiet_period_s=60), lambda _session, job: asked.get(job.id)
    )
    assert assembler.advance() is None
    assert state(database, short) is JobState.complete


def test_without_a_rule_quiet_period_the_default_applies(database: Database) -> None:
    job = add_job(database, [CTImageStorage] * 3, quiet_for_s=1)
    assembler = Assembler(database, AssembleSettings(quiet_period_s=60), lambda _s, _j: None)
    due_in = assembler.advance()
    assert state(database, job) is JobState.received
    assert due_in is not None and 58 < due_in <= 59
