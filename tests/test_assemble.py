from __future__ import annotations

import datetime as dt

from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation

from cadnode.assemble import Assembler
from cadnode.config import AssembleSettings
from cadnode.db import Database, Instance, Job, JobState, Study, utcnow


def add_job(database: Database, sop_classes: list[str], quiet_for_s: float) -> int:
    with database.session() as session:
        study = Study(study_uid=f"1.2.{len(sop_classes)}.{int(quiet_for_s)}")
        session.add(study)
        session.flush()
        assert study.id is not None
        last = utcnow() - dt.timedelta(seconds=quiet_for_s)
        job = Job(
            study_id=study.id, version=1, instance_count=len(sop_classes), last_instance_at=last
        )
        session.add(job)
        session.flush()
        assert job.id is not None
        for i, sop_class in enumerate(sop_classes):
            session.add(
                Instance(
                    sop_instance_uid=f"{study.study_uid}.{i}",
                    sop_class_uid=sop_class,
                    series_uid="1.2",
                    transfer_syntax="1.2.840.10008.1.2.1",
                    path="x",
                    size=1,
                    calling_ae="A",
                    peer="p",
                    job_id=job.id,
                )
            )
        session.commit()
        return job.id


def state(database: Database, job_id: int) -> JobState:
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.state


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
